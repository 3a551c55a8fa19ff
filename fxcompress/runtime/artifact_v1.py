"""Converting version-1 artifacts (a pickled ``structure.pt``) to the current data-only format.

The one place in fxcompress that unpickles a file with ``weights_only=False``, and only when the caller passes
``trust=True`` (CLI: ``fxcompress convert-artifact OLD NEW --trust``); ``load_artifact`` never does.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx
from safetensors.torch import load_file

from ..passes.base import REPORT_KEY
from .artifact import FORMAT, ArtifactError, check_files, parse_manifest_json, save_artifact


def convert_v1(old, new, *, trust: bool = False) -> Path:
    """Convert a version-1 artifact (pickled ``structure.pt``) to the current format.

    This UNPICKLES ``structure.pt``, which runs any code its author put in it: only for artifacts you trust,
    hence ``trust=True`` is required.
    """
    if trust is not True:
        raise ArtifactError("convert_v1 unpickles the old artifact's structure.pt, which can run code: pass "
                            "trust=True (CLI: --trust) only for an artifact from a source you trust")
    o = Path(old)
    manifest = parse_manifest_json(o)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != 1:
        raise ArtifactError(f"{o} is not a version-1 fxcompress artifact (format_version "
                            f"{manifest.get('format_version')!r}); nothing to convert")
    check_files(o, manifest, ("weights.safetensors", "structure.pt"))
    gm = torch.load(o / "structure.pt", map_location="meta", weights_only=False)  # trusted by the caller
    sd = load_file(str(o / "weights.safetensors"))
    for name, src in manifest.get("aliases", {}).items():
        sd[name] = sd[src]
    gm.load_state_dict(sd, strict=True, assign=True)
    if isinstance(gm, fx.GraphModule):
        gm.meta[REPORT_KEY] = [(name, rows) for name, rows in manifest.get("reports", [])]
    return save_artifact(gm, new, extra=manifest.get("extra"))
