"""Running and storing deployed artifacts."""
from .artifact import ArtifactError, load, read_manifest, save

__all__ = ["ArtifactError", "load", "read_manifest", "save"]
