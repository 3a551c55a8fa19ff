"""Save / load compressed graph modules: safetensors tensors + a JSON manifest with a format version.

Layout of an artifact directory::

    manifest.json         format, version, files with sha256, tensor names, per-layer report
    weights.safetensors   every parameter and buffer (packed integer codes stay packed)
    structure.pt          the module tree and graph with tensors on the meta device (no data)

``structure.pt`` is a pickle, like any ``torch.load`` file: load artifacts you trust.
A changed or truncated file is caught by its sha256 before anything is unpickled.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
import torch.fx as fx
from safetensors.torch import load_file, save_file

from ..passes.base import REPORT_KEY

FORMAT = "fxcompress-artifact"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact directory is missing, corrupt, or of an unknown format version."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(gm: fx.GraphModule, directory, *, extra: dict | None = None) -> Path:
    """Write ``gm`` to ``directory`` (created if needed); ``gm`` itself is not changed."""
    if not isinstance(gm, torch.nn.Module):
        raise ValueError(f"save() needs a torch.nn.Module, got {type(gm).__name__}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    seen = {}
    aliases = {}
    for name, t in list(gm.state_dict(keep_vars=False).items()):
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(d / "weights.safetensors"))
    skeleton = copy.deepcopy(gm).to("meta")
    torch.save(skeleton, d / "structure.pt")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fxcompress_version": __import__("fxcompress").__version__,
        "torch_version": torch.__version__,
        "files": {f: _sha256(d / f) for f in ("weights.safetensors", "structure.pt")},
        "aliases": aliases,
        "reports": [[name, rows] for name, rows in getattr(gm, "meta", {}).get(REPORT_KEY, [])],
        "extra": extra or {},
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return d


def read_manifest(directory) -> dict:
    d = Path(directory)
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{d} is not an fxcompress artifact: manifest.json is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is corrupt: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format_version {manifest.get('format_version')!r} is not supported "
                            f"(this fxcompress reads version {FORMAT_VERSION})")
    return manifest


def load(directory, map_location: str | torch.device = "cpu") -> fx.GraphModule:
    """Load an artifact written by :func:`save`, bit-exact; files are checked against their sha256 first."""
    d = Path(directory)
    manifest = read_manifest(d)
    for fname, digest in manifest["files"].items():
        p = d / fname
        if not p.is_file():
            raise ArtifactError(f"artifact {d} is missing {fname}")
        if _sha256(p) != digest:
            raise ArtifactError(f"artifact {d}: {fname} is corrupt or was changed (sha256 mismatch)")
    gm = torch.load(d / "structure.pt", map_location="meta", weights_only=False)
    sd = load_file(str(d / "weights.safetensors"), device=str(map_location))
    for name, src in manifest.get("aliases", {}).items():
        sd[name] = sd[src]
    gm.load_state_dict(sd, strict=True, assign=True)
    if isinstance(gm, fx.GraphModule):
        gm.meta[REPORT_KEY] = [(name, rows) for name, rows in manifest.get("reports", [])]
    return gm
