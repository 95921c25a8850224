"""The Store backends: ``s3://bucket[/prefix]``, ``gs://bucket[/prefix]``, ``file:///abs/path``.

``open_store(settings)`` returns the one ``settings.backup_bucket`` names (``open_url`` takes
the URL itself, e.g. for a restore from an external disk). Each backend keeps the contract of
policy/backup/store.py; tests/test_backup_store.py holds all three to it against real servers
on loopback (moto for S3, gcp-storage-emulator for GCS).

Credentials
-----------
``s3://`` - boto3's standard chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and
``AWS_PROFILE``, ``AWS_DEFAULT_REGION``) in the environment, then ``~/.aws/credentials`` and
``~/.aws/config``, then the instance role (EC2/ECS metadata). ``backup_s3_endpoint`` points
it at an S3-compatible store (MinIO, Ceph, Wasabi ...), which then gets path-style URLs.

``gs://`` - the first that applies:

1. ``boto_gs_oauth2_refresh_token`` (the seed's ``boto:gs_oauth2_refresh_token``, made by
   ``gsutil config``): user credentials from that refresh token with gsutil's own OAuth
   client id and secret (public: gsutil's gslib/utils/system_util.py; an installed app's
   "secret" is no secret, the refresh token is). The project is
   ``boto_default_project_id`` (objects need none; it is passed on for billing/quota).
2. ``backup_gcs_endpoint`` set (an emulator or a private endpoint): the service-account or
   user file in ``GOOGLE_APPLICATION_CREDENTIALS`` if set, else anonymous credentials. The
   rest of ``google.auth.default()``'s search is skipped there, so nothing ever asks the GCE
   metadata server (169.254.169.254) on a machine pointed at an emulator.
3. Otherwise Google's standard credentials, ``google.auth.default()``:
   ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's application-default login, the metadata
   server of a GCE/GKE machine.

``file://`` - the file system; the directory must exist (an external disk that is not
mounted is an error, never a silent write to the mount point).

Behaviour
---------
* Keys are ``/``-separated, without a leading ``/``, empty, ``.`` or ``..`` segments (the
  same rule for every backend, so a key that works on one works on all).
* A prefix in the URL (``s3://bucket/mail/host1``) is kept out of the keys: ``put("a")``
  writes ``mail/host1/a`` and ``list()`` returns ``a``; ``s3://bucket/mail`` never sees
  ``mail2/...``.
* ``put``: S3 uses one PutObject up to ``Transfer.part_size``, a multipart upload above (the
  object exists only once CompleteMultipartUpload succeeds; s3transfer aborts the upload on
  failure - but when the failure is the network itself, the abort does not reach S3 either:
  the parts sent so far stay, invisible to ``list`` and ``get`` and billed as storage, until a
  bucket lifecycle rule "AbortIncompleteMultipartUpload" removes them; set one, e.g. after
  7 days; tests/test_backup_cloud.py shows such a leftover upload on moto after an interrupted
  run). GCS uses one multipart request up to 8 MiB, a resumable session above (the object
  exists only when the last chunk is in). Both send a CRC32/CRC32C of the content, so a body
  cut short is refused rather than stored. ``file://`` writes ``<root>/.partial/<random>``,
  fsyncs it and renames it over the key (``.partial`` is never listed nor a valid key part;
  files are 0600, like everything ``get`` writes).
* ``get`` writes a temporary file beside ``path`` and renames it over ``path`` once complete:
  a failed download leaves ``path`` as it was. Downloads check the server's checksum.
* Every failure is a ``StoreError`` naming the operation, the bucket URL and the key, with the
  library's exception as ``__cause__``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from policy.backup.store import Store, StoredObject, StoreError

if TYPE_CHECKING:
    from google.auth.credentials import Credentials as GoogleCredentials

    from policy.settings import Settings

MiB = 1024 * 1024

# gsutil's OAuth client (GetGsutilClientIdAndSecret in gsutil's gslib/utils/system_util.py):
# `gsutil config` made the seed's refresh token for this client, and Google only refreshes a
# token for the client it was issued to. Installed-app client secrets are public by design.
GSUTIL_CLIENT_ID = "909320924072.apps.googleusercontent.com"
GSUTIL_CLIENT_SECRET = "p3RlpR10xMFh9ZXBS/ZNLYUu"  # noqa: S105 - public, see above
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret

# The file:// backend's directory for uploads in progress (renamed over the key when complete).
PARTIAL_DIR = ".partial"


@dataclass(frozen=True, slots=True)
class Transfer:
    """How objects move. The defaults suit a small mail server: S3 reads parts from the file
    as it sends them; GCS holds one resumable chunk (``part_size``) in memory."""

    # S3: files above this go up as a multipart upload in parts of this size (S3 allows at
    # most 10,000 parts: 16 MiB parts reach about 160 GB). GCS: the chunk size of a resumable upload
    # (used above 8 MiB, google-cloud-storage's fixed threshold). At least 5 MiB (S3's minimum
    # part), a multiple of 256 KiB (GCS's chunk granularity).
    part_size: int = 16 * MiB
    # S3: parts uploaded, and ranges downloaded, in parallel.
    concurrency: int = 4
    # Seconds one request may take to connect, and to go on sending/receiving.
    timeout: float = 60.0
    # S3: attempts per request (botocore "standard" retry mode: throttling, 5xx, connection
    # errors), the first included.
    attempts: int = 5
    # GCS: seconds google-api-core keeps retrying one request (exponential backoff).
    retry_deadline: float = 120.0

    def __post_init__(self) -> None:
        if self.part_size < 5 * MiB or self.part_size % (256 * 1024):
            raise ValueError("part_size must be >= 5 MiB and a multiple of 256 KiB")
        if self.concurrency < 1 or self.attempts < 1:
            raise ValueError("concurrency and attempts must be >= 1")
        if self.timeout <= 0 or self.retry_deadline < 0:
            raise ValueError("timeout must be positive, retry_deadline not negative")


def open_store(settings: Settings, transfer: Transfer | None = None) -> Store:
    """The Store for ``settings.backup_bucket`` (StoreError if it is unset or malformed)."""
    if not settings.backup_bucket:
        raise StoreError("backup_bucket is not set")
    return open_url(settings.backup_bucket, settings, transfer)


def open_url(url: str, settings: Settings, transfer: Transfer | None = None) -> Store:
    """The Store for ``url`` (``s3://``, ``gs://`` or ``file:///``); credentials and endpoints
    come from ``settings``. Opening sends no request to the store; only finding credentials
    may ask a metadata service (boto3's chain on EC2, ``google.auth.default()`` on GCE), never
    with ``backup_gcs_endpoint`` set and never when keys are in the environment."""
    transfer = transfer or Transfer()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise StoreError(f"{url}: a file:// URL must name an absolute path (file:///dir)")
        if parts.query or parts.fragment:
            raise StoreError(f"{url}: a file:// URL takes no query or fragment")
        return FileStore(Path(unquote(parts.path)), url)
    if scheme not in ("s3", "gs"):
        raise StoreError(f"{url}: the backup bucket must be an s3://, gs:// or file:/// URL")
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]", bucket):
        raise StoreError(f"{url}: {bucket!r} is not a bucket name")
    if parts.query or parts.fragment or (prefix and not _valid_key(prefix)):
        raise StoreError(f"{url}: the prefix must be a path like /dir/subdir")
    prefix = prefix + "/" if prefix else ""
    if scheme == "s3":
        return S3Store(bucket, prefix, url, _s3_client(settings, transfer), transfer)
    return GCSStore(bucket, prefix, url, _gcs_client(settings, url), transfer)


def _valid_key(key: str) -> bool:
    if not key or key.startswith("/") or any(c in key for c in "\0\r\n"):
        return False
    return all(seg not in ("", ".", "..") for seg in key.split("/"))


def _check_key(url: str, op: str, key: str) -> None:
    if not _valid_key(key):
        raise StoreError(
            f"{op} {url} key {key!r}: not a valid key (a/b/c, no leading '/', "
            "no empty, '.' or '..' parts)"
        )


def _describe(error: BaseException) -> str:
    text = str(error).strip().replace("\n", " ")
    if len(text) > 400:
        text = text[:400] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def _failures(
    url: str,
    op: str,
    key: str,
    describe: Callable[[Exception], str] = _describe,
) -> Iterator[None]:
    """Turn whatever the library raises into a StoreError naming the bucket and the key."""
    try:
        yield
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"{op} {url} key {key!r}: {describe(e)}") from e


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed over it if the block completes, removed if
    not: a failed download never leaves a partial file where the caller looks."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- file:// ---------------------------------------------------------------------------------


class FileStore:
    """A local directory (tests; an admin's external disk). Keys are relative paths, so one
    key cannot also be the start of another ("a" and "a/b"): that put is a StoreError."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url

    def _path(self, op: str, key: str) -> Path:
        _check_key(self.url, op, key)
        if PARTIAL_DIR in key.split("/"):
            raise StoreError(f"{op} {self.url} key {key!r}: {PARTIAL_DIR} is reserved here")
        if not self.root.is_dir():
            raise StoreError(
                f"{op} {self.url} key {key!r}: no directory {self.root} (the "
                "bucket is missing; an external disk not mounted?)"
            )
        return self.root / key

    def put(self, key: str, path: Path) -> None:
        target = self._path("put", key)
        with _failures(self.url, "put", key):
            partial = self.root / PARTIAL_DIR
            partial.mkdir(exist_ok=True)
            fd, name = tempfile.mkstemp(dir=partial, suffix=".partial")
            try:
                with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, MiB)
                    dst.flush()
                    os.fsync(dst.fileno())
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(name, target)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)
            _fsync_dir(target.parent)

    def get(self, key: str, path: Path) -> None:
        source = self._path("get", key)
        if not source.is_file():
            raise StoreError(f"get {self.url} key {key!r}: no such object")
        with _failures(self.url, "get", key), _replacing(path) as tmp:
            shutil.copyfile(source, tmp)

    def list(self, prefix: str = "") -> list[StoredObject]:
        if not self.root.is_dir():
            raise StoreError(
                f"list {self.url} key {prefix!r}: no directory {self.root} (the "
                "bucket is missing; an external disk not mounted?)"
            )
        found = []

        def fail(e: OSError) -> None:
            raise e

        with _failures(self.url, "list", prefix):
            for top, dirs, files in os.walk(self.root, onerror=fail):
                rel = Path(top).relative_to(self.root).as_posix()
                base = "" if rel == "." else rel + "/"
                # Skip uploads in progress (a store on a subdirectory has its own), and whole
                # subtrees that cannot hold a match.
                dirs[:] = [
                    d for d in dirs if d != PARTIAL_DIR and _may_contain(base + d + "/", prefix)
                ]
                for name in files:
                    key = base + name
                    if key.startswith(prefix):
                        found.append(StoredObject(key, os.stat(os.path.join(top, name)).st_size))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        target = self._path("delete", key)
        if target.is_dir():
            return  # only keys below it exist, as on S3 or GCS: this one does not
        with _failures(self.url, "delete", key):
            target.unlink(missing_ok=True)
            # Remove directories the key leaves empty, so list() and an admin's `ls` stay tidy.
            parent = target.parent
            while parent != self.root:
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent


def _may_contain(directory: str, prefix: str) -> bool:
    return directory.startswith(prefix) or prefix.startswith(directory)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- s3:// -----------------------------------------------------------------------------------


def _s3_client(settings: Settings, transfer: Transfer) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=transfer.timeout,
        read_timeout=transfer.timeout,
        retries={"mode": "standard", "max_attempts": transfer.attempts},
        # S3-compatible stores (and emulators) answer on one host name: path-style URLs.
        s3={"addressing_style": "path" if settings.backup_s3_endpoint else "auto"},
    )
    try:
        return boto3.session.Session().client(
            "s3", endpoint_url=settings.backup_s3_endpoint or None, config=config
        )
    except Exception as e:
        raise StoreError(f"s3: cannot make a client: {_describe(e)}") from e


def _s3_error_code(error: Exception) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class S3Store:
    """Amazon S3 or an S3-compatible store, through boto3."""

    def __init__(self, bucket: str, prefix: str, url: str, client: Any, transfer: Transfer) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix
        self.url = url
        self.client = client
        self._config = TransferConfig(
            multipart_threshold=transfer.part_size,
            multipart_chunksize=transfer.part_size,
            max_concurrency=transfer.concurrency,
            use_threads=transfer.concurrency > 1,
        )

    def _name(self, op: str, key: str) -> str:
        _check_key(self.url, op, key)
        return self.prefix + key

    def put(self, key: str, path: Path) -> None:
        name = self._name("put", key)
        with _failures(self.url, "put", key):
            self.client.upload_file(
                str(path),
                self.bucket,
                name,
                Config=self._config,
                ExtraArgs={"ContentType": "application/octet-stream"},
            )

    def get(self, key: str, path: Path) -> None:
        name = self._name("get", key)
        with _failures(self.url, "get", key, self._missing), _replacing(path) as tmp:
            self.client.download_file(self.bucket, name, str(tmp), Config=self._config)

    def _missing(self, error: Exception) -> str:
        # download_file starts with a HEAD, whose 404 has no body to say what is missing.
        if _s3_error_code(error) not in ("404", "NoSuchKey"):
            return _describe(error)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:
            return f"no such bucket {self.bucket!r} (or no access to it)"
        return "no such object"

    def list(self, prefix: str = "") -> list[StoredObject]:
        found = []
        with _failures(self.url, "list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][len(self.prefix) :]
                    found.append(StoredObject(key, int(item["Size"])))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        name = self._name("delete", key)
        with _failures(self.url, "delete", key):
            # S3 answers 204 for a missing key; a missing bucket is NoSuchBucket.
            self.client.delete_object(Bucket=self.bucket, Key=name)


# --- gs:// -----------------------------------------------------------------------------------


def gcs_credentials(settings: Settings, url: str = "gs://") -> tuple[GoogleCredentials, str | None]:
    """The credentials and project for gs:// (the order is in the module docstring). Builds
    them only: nothing is refreshed or fetched here (except by google.auth.default())."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.oauth2.credentials import Credentials

    project = settings.boto_default_project_id or None
    if settings.boto_gs_oauth2_refresh_token:
        user = Credentials(  # type: ignore[no-untyped-call]
            token=None,
            refresh_token=settings.boto_gs_oauth2_refresh_token,
            client_id=GSUTIL_CLIENT_ID,
            client_secret=GSUTIL_CLIENT_SECRET,
            token_uri=GOOGLE_TOKEN_URI,
        )
        return user, project
    if settings.backup_gcs_endpoint and not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return AnonymousCredentials(), project  # type: ignore[no-untyped-call]
    found: GoogleCredentials
    try:
        # With GOOGLE_APPLICATION_CREDENTIALS set, default() takes that file and looks no
        # further (the metadata server is its last resort).
        found, default_project = google.auth.default()
        return found, project or default_project
    except Exception as e:
        raise StoreError(
            f"{url}: no Google Cloud credentials: {_describe(e)} (set "
            "boto_gs_oauth2_refresh_token or GOOGLE_APPLICATION_CREDENTIALS)"
        ) from e


def _gcs_client(settings: Settings, url: str) -> Any:
    from google.cloud import storage

    credentials, project = gcs_credentials(settings, url)
    options = (
        {"api_endpoint": settings.backup_gcs_endpoint} if settings.backup_gcs_endpoint else None
    )
    try:
        return storage.Client(project=project, credentials=credentials, client_options=options)
    except Exception as e:
        raise StoreError(f"{url}: cannot make a client: {_describe(e)}") from e


class GCSStore:
    """Google Cloud Storage, through google-cloud-storage (the JSON API)."""

    def __init__(self, bucket: str, prefix: str, url: str, client: Any, transfer: Transfer) -> None:
        from google.api_core.retry import Retry
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.bucket = bucket
        self.prefix = prefix
        self.url = url
        self.client = client
        self._transfer = transfer
        self._retry: Retry = DEFAULT_RETRY.with_timeout(transfer.retry_deadline)
        self._bucket = client.bucket(bucket)

    def _blob(self, op: str, key: str) -> Any:
        _check_key(self.url, op, key)
        # chunk_size for uploads only: with one, downloads would go in ranged chunks, whose
        # CRC32C the library does not check (a whole-object GET is checked, and resumed).
        chunk_size = self._transfer.part_size if op == "put" else None
        return self._bucket.blob(self.prefix + key, chunk_size=chunk_size)

    def _missing(self, error: Exception) -> str:
        from google.api_core.exceptions import NotFound

        if not isinstance(error, NotFound):
            return _describe(error)
        try:
            exists = self._bucket.exists(timeout=self._transfer.timeout, retry=self._retry)
        except Exception as e:
            return f"not found, and the bucket cannot be checked: {_describe(e)}"
        return "no such object" if exists else f"no such bucket {self.bucket!r}"

    def put(self, key: str, path: Path) -> None:
        blob = self._blob("put", key)
        with _failures(self.url, "put", key, self._missing):
            blob.upload_from_filename(
                str(path),
                content_type="application/octet-stream",
                checksum="auto",
                timeout=self._transfer.timeout,
                retry=self._retry,
            )

    def get(self, key: str, path: Path) -> None:
        blob = self._blob("get", key)
        with (
            _failures(self.url, "get", key, self._missing),
            _replacing(path) as tmp,
            open(tmp, "wb") as f,
        ):
            blob.download_to_file(
                f, checksum="auto", timeout=self._transfer.timeout, retry=self._retry
            )

    def list(self, prefix: str = "") -> list[StoredObject]:
        found = []
        with _failures(self.url, "list", prefix, self._missing):
            for blob in self.client.list_blobs(
                self.bucket,
                prefix=self.prefix + prefix,
                timeout=self._transfer.timeout,
                retry=self._retry,
            ):
                found.append(StoredObject(blob.name[len(self.prefix) :], int(blob.size or 0)))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        from google.api_core.exceptions import NotFound

        blob = self._blob("delete", key)
        with _failures(self.url, "delete", key, self._missing):
            try:
                blob.delete(timeout=self._transfer.timeout, retry=self._retry)
            except NotFound as e:
                # A missing key is fine; a missing bucket is not (both are a 404).
                reason = self._missing(e)
                if reason != "no such object":
                    raise StoreError(f"delete {self.url} key {key!r}: {reason}") from e
