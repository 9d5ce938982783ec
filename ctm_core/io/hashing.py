"""sha256 of bytes, files and streams: the digest every artifact of the project is pinned and verified with."""

from __future__ import annotations

import hashlib
import os
from typing import IO

__all__ = ["CHUNK_BYTES", "sha256_bytes", "sha256_file", "sha256_fileobj"]

CHUNK_BYTES = 1 << 20  # 1 MiB chunks: hashing in constant memory


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a bytes object."""
    return hashlib.sha256(data).hexdigest()


def sha256_fileobj(fileobj: IO[bytes], chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of the remaining bytes of a binary file object."""
    h = hashlib.sha256()
    for chunk in iter(lambda: fileobj.read(chunk_bytes), b""):
        h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    with open(path, "rb") as f:
        return sha256_fileobj(f, chunk_bytes)
