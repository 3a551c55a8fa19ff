"""Errors of the LM deployment package."""
from __future__ import annotations


class LMError(ValueError):
    """A causal LM cannot be compiled, run or loaded as asked; the message says what and what to do."""


class KVCacheRewriteError(LMError):
    """The KV-cache rewrite cannot handle an attention node of the graph (the node is named)."""
