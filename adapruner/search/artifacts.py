"""Where pruned models are kept: an Optuna artifact store named by a folder or an ``s3://`` URL.

A folder (``FileSystemArtifactStore``) suits one machine, or many sharing a filesystem; ``s3://BUCKET``
(``Boto3ArtifactStore``, needs ``boto3``; credentials and endpoint from the usual AWS variables)
suits workers that share nothing but the database.
"""

from __future__ import annotations

from pathlib import Path

from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore
from optuna.artifacts._protocol import ArtifactStore

from ..errors import AdaPrunerError


def artifact_store(location: str | Path, client=None) -> ArtifactStore:
    text = str(location)
    if text.startswith("s3://"):
        bucket = text.removeprefix("s3://").strip("/")
        if not bucket or "/" in bucket:
            raise AdaPrunerError(f"artifact store {text!r}: use s3://BUCKET (prefixes are not supported)")
        try:
            return Boto3ArtifactStore(bucket, client=client)
        except ImportError:
            raise AdaPrunerError("an s3:// artifact store needs boto3: pip install boto3") from None
    path = Path(text)
    path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))
