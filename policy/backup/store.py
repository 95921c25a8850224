"""Where backup objects are kept: the contract every backend fulfils.

A ``Store`` holds objects under keys (``/``-separated, no leading ``/``) below the bucket's
prefix. Backends: ``gs://bucket[/prefix]`` (Google Cloud Storage), ``s3://bucket[/prefix]``
(S3 and S3-compatible), and ``file:///path`` (a local directory: tests, and an admin's
external disk). ``open_store(settings)`` picks one from ``backup_bucket``.

Contract (tests/test_backup_store.py holds every backend to it):

* ``put(key, path)`` uploads the file at ``path``; when it returns the object is complete and
  readable. A ``put`` that fails or is interrupted never leaves a complete-looking object of
  the wrong content under ``key`` (backends upload to the key itself only in one request, or
  to a temporary key renamed at the end); it raises StoreError.
* ``get(key, path)`` downloads into ``path`` (created or replaced); StoreError if missing.
* ``list(prefix)`` returns every object whose key starts with ``prefix``, sorted by key,
  with its size.
* ``delete(key)`` removes it; deleting a missing key is not an error.
* Every failure (network, credentials, missing bucket) is a ``StoreError`` naming the bucket
  and the key, never a library's own exception type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class StoreError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int


class Store(Protocol):
    url: str  # the bucket URL, for messages

    def put(self, key: str, path: Path) -> None: ...

    def get(self, key: str, path: Path) -> None: ...

    def list(self, prefix: str = "") -> list[StoredObject]: ...

    def delete(self, key: str) -> None: ...
