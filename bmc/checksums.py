"""File checksums that builds record and servers verify (torch-free: serving imports it)."""
from __future__ import annotations

import hashlib


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
