"""Every backup Store backend held to one contract (policy/backup/store.py), over the wire.

* ``s3://`` - moto's S3 server (``moto[server]``, ThreadedMotoServer) on 127.0.0.1, reached by
  the backend's own boto3 client through ``backup_s3_endpoint``; dummy AWS keys in the
  environment of each test only.
* ``gs://`` - gcp-storage-emulator's GCS JSON API server on 127.0.0.1, reached through
  ``backup_gcs_endpoint`` (anonymous credentials: nothing asks Google or a metadata server).
* ``file://`` - a temporary directory.

Both servers are module-scoped, on free ports (port 0), in this process: xdist workers each
have their own. Each test makes its own buckets. A loopback-only guard is on for every test:
a connection or name lookup for anything but loopback fails the operation (so a backend that
fell back to a real endpoint would fail here, never reach AWS or Google).

Interrupted uploads go through ``CutProxy``, a TCP proxy that ends every connection (FIN, then
RST) once a number of bytes have gone upstream: the server sees the body stop mid-request, as
when the uploading process dies or the network fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import ipaddress
import json
import os
import socket
import struct
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from gcp_storage_emulator.server import create_server as create_gcs_server
from google.cloud import storage as gcs_storage
from moto.server import ThreadedMotoServer

from policy.backup import backends
from policy.backup.backends import GSUTIL_CLIENT_ID, GSUTIL_CLIENT_SECRET, Transfer, open_url
from policy.backup.store import Store, StoredObject, StoreError
from policy.settings import Settings

pytestmark = pytest.mark.integration


MiB = 1024 * 1024
# Small parts (S3's minimum) so 20 MB goes up in 4 parts / 4 resumable chunks; few retries,
# short deadlines, so a dead server fails a test in seconds.
FAST = Transfer(part_size=5 * MiB, concurrency=4, timeout=10.0, attempts=2, retry_deadline=2.0)
LARGE = 20 * MiB


# --- the loopback guard and the environment ----------------------------------------------------


def _loopback(host: object) -> bool:
    if host in (None, "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def guard_loopback(mp: pytest.MonkeyPatch, nothing: Path) -> None:
    """Through ``mp``: lookups and connections to anything but loopback raise OSError; dummy
    AWS credentials; no AWS or gcloud configuration of the machine's (``nothing`` stands in
    for their files)."""
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _loopback(host.decode() if isinstance(host, bytes) else host):
            raise OSError(f"test guard: lookup of non-loopback host {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            raise OSError(f"test guard: connection to non-loopback {address!r}")

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return real_connect_ex(sock, address)

    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket.socket, "connect_ex", connect_ex)

    for name in list(os.environ):
        if name.startswith(("AWS_", "GOOGLE_", "CLOUDSDK_", "GCE_")) or name in (
            "STORAGE_EMULATOR_HOST",
            "API_ENDPOINT_OVERRIDE",
        ):
            mp.delenv(name)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.setenv("AWS_CONFIG_FILE", str(nothing / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nothing / "no-aws-credentials"))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("CLOUDSDK_CONFIG", str(nothing / "no-gcloud"))


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reaches anything but loopback; dummy credentials, no ~/.aws or gcloud files."""
    guard_loopback(monkeypatch, tmp_path)


# --- the servers --------------------------------------------------------------------------------


def _start_s3() -> tuple[Any, str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server, endpoint = _start_s3()
    yield endpoint
    server.stop()


def _start_gcs() -> tuple[Any, str]:
    server = create_gcs_server("127.0.0.1", 0, in_memory=True)
    server.start()
    # create_server takes a port but does not say which one port 0 became: its HTTPServer does.
    port = server._api._httpd.server_port
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def gcs_endpoint() -> Iterator[str]:
    server, endpoint = _start_gcs()
    yield endpoint
    server.stop()


def _s3_admin(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def _gcs_admin(endpoint: str) -> Any:
    from google.auth.credentials import AnonymousCredentials

    return gcs_storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:16]}"


@dataclass
class Backend:
    """One kind of store, and how a test makes buckets and opens stores on it."""

    kind: str
    endpoint: str  # "" for file
    tmp: Path

    def new_bucket(self) -> str:
        """A new, empty bucket: its URL without prefix."""
        name = _name()
        if self.kind == "file":
            (self.tmp / "buckets" / name).mkdir(parents=True)
            return f"file://{self.tmp / 'buckets' / name}"
        if self.kind == "s3":
            _s3_admin(self.endpoint).create_bucket(Bucket=name)
            return f"s3://{name}"
        _gcs_admin(self.endpoint).create_bucket(name)
        return f"gs://{name}"

    def missing_bucket(self) -> str:
        if self.kind == "file":
            return f"file://{self.tmp / 'no-such-disk'}"
        return f"{self.kind}://{_name()}-missing"

    def within(self, url: str, prefix: str) -> str:
        if self.kind == "file":
            (Path(url.removeprefix("file://")) / prefix).mkdir(parents=True, exist_ok=True)
        return f"{url}/{prefix}"

    def settings(self, url: str, endpoint: str | None = None) -> Settings:
        endpoint = self.endpoint if endpoint is None else endpoint
        return Settings(
            backup_bucket=url,
            backup_s3_endpoint=endpoint if self.kind == "s3" else "",
            backup_gcs_endpoint=endpoint if self.kind == "gs" else "",
        )

    def open(self, url: str, endpoint: str | None = None, transfer: Transfer = FAST) -> Store:
        return backends.open_store(self.settings(url, endpoint), transfer)


@pytest.fixture(params=["file", "s3", "gs"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return Backend("file", "", tmp_path)
    fixture = "s3_endpoint" if request.param == "s3" else "gcs_endpoint"
    return Backend(request.param, request.getfixturevalue(fixture), tmp_path)


@pytest.fixture
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The network backends only (interruptions, dead servers)."""
    kind = request.param
    fixture = "s3_endpoint" if kind == "s3" else "gcs_endpoint"
    return Backend(kind, request.getfixturevalue(fixture), tmp_path)


@pytest.fixture(scope="module")
def large_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("large") / "large.bin"
    path.write_bytes(os.urandom(LARGE))
    return path


def _file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def _named(error: StoreError, url: str, key: str) -> None:
    """The message names the bucket and the key."""
    text = str(error)
    bucket = url.split("://", 1)[1].split("/", 1)[0] if not url.startswith("file:") else url
    assert bucket in text, text
    assert repr(key) in text, text


# --- the contract -------------------------------------------------------------------------------


def test_put_get_round_trip(backend: Backend, tmp_path: Path) -> None:
    store = backend.open(backend.new_bucket())
    data = b"backup bytes \x00\xff" * 1000
    store.put("2024-05-01/full.tar.enc", _file(tmp_path, "src", data))
    dest = _file(tmp_path, "dest", b"an older file at the destination, to be replaced")
    store.get("2024-05-01/full.tar.enc", dest)
    assert dest.read_bytes() == data
    fresh = tmp_path / "fresh"
    store.get("2024-05-01/full.tar.enc", fresh)
    assert fresh.read_bytes() == data
    # get leaves no temporary files beside the destination.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_put_replaces_and_empty_objects(backend: Backend, tmp_path: Path) -> None:
    store = backend.open(backend.new_bucket())
    store.put("k", _file(tmp_path, "one", b"first version"))
    store.put("k", _file(tmp_path, "two", b"second"))
    store.put("empty", _file(tmp_path, "zero", b""))
    store.get("k", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"second"
    store.get("empty", tmp_path / "out0")
    assert (tmp_path / "out0").read_bytes() == b""
    assert store.list() == [StoredObject("empty", 0), StoredObject("k", 6)]


def test_list_sorted_with_sizes_and_prefix(backend: Backend, tmp_path: Path) -> None:
    store = backend.open(backend.new_bucket())
    for key, size in [("b/2", 2), ("a/10", 10), ("ab", 3), ("a/1", 1), ("a/sub/deep", 4)]:
        store.put(key, _file(tmp_path, "src", b"x" * size))
    assert store.list() == [
        StoredObject("a/1", 1),
        StoredObject("a/10", 10),
        StoredObject("a/sub/deep", 4),
        StoredObject("ab", 3),
        StoredObject("b/2", 2),
    ]
    assert [o.key for o in store.list("a/")] == ["a/1", "a/10", "a/sub/deep"]
    assert [o.key for o in store.list("a")] == ["a/1", "a/10", "a/sub/deep", "ab"]
    assert [o.key for o in store.list("a/1")] == ["a/1", "a/10"]
    assert store.list("zzz") == []


def test_delete(backend: Backend, tmp_path: Path) -> None:
    store = backend.open(backend.new_bucket())
    store.put("dir/a", _file(tmp_path, "src", b"a"))
    store.put("dir/b", _file(tmp_path, "src", b"b"))
    store.delete("dir/a")
    assert [o.key for o in store.list()] == ["dir/b"]
    store.delete("dir/a")  # already gone: not an error
    store.delete("never/was")
    store.delete("dir/b")
    assert store.list() == []
    with pytest.raises(StoreError):
        store.get("dir/a", tmp_path / "out")


def test_prefix_is_kept_out_of_keys(backend: Backend, tmp_path: Path) -> None:
    bucket = backend.new_bucket()
    whole = backend.open(bucket)
    host1 = backend.open(backend.within(bucket, "mail/host1"))
    host1x = backend.open(backend.within(bucket, "mail/host1x"))
    host1.put("full.enc", _file(tmp_path, "a", b"one"))
    host1x.put("full.enc", _file(tmp_path, "b", b"other"))
    assert host1.list() == [StoredObject("full.enc", 3)]
    assert host1x.list() == [StoredObject("full.enc", 5)]
    assert [o.key for o in whole.list()] == ["mail/host1/full.enc", "mail/host1x/full.enc"]
    whole.get("mail/host1/full.enc", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"one"
    host1.delete("full.enc")
    assert [o.key for o in whole.list()] == ["mail/host1x/full.enc"]


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/", "a\nb"])
def test_invalid_keys_are_refused(backend: Backend, tmp_path: Path, key: str) -> None:
    store = backend.open(backend.new_bucket())
    src = _file(tmp_path, "src", b"x")
    for call in (
        lambda: store.put(key, src),
        lambda: store.get(key, tmp_path / "out"),
        lambda: store.delete(key),
    ):
        with pytest.raises(StoreError, match="not a valid key"):
            call()


def test_get_of_a_missing_key(backend: Backend, tmp_path: Path) -> None:
    url = backend.new_bucket()
    store = backend.open(url)
    dest = _file(tmp_path, "dest", b"keep me")
    with pytest.raises(StoreError) as caught:
        store.get("no/such/key", dest)
    _named(caught.value, url, "no/such/key")
    assert "no such object" in str(caught.value)
    assert dest.read_bytes() == b"keep me"  # a failed get leaves the destination alone
    assert [p.name for p in tmp_path.iterdir() if p.name != "buckets"] == ["dest"]


def test_missing_bucket(backend: Backend, tmp_path: Path) -> None:
    url = backend.missing_bucket()
    store = backend.open(url)
    src = _file(tmp_path, "src", b"x")
    calls: list[tuple[str, Callable[[], object]]] = [
        ("k1", lambda: store.put("k1", src)),
        ("k2", lambda: store.get("k2", tmp_path / "out")),
        ("k3", lambda: store.delete("k3")),
        ("pre/", lambda: store.list("pre/")),
    ]
    for key, call in calls:
        with pytest.raises(StoreError) as caught:
            call()
        _named(caught.value, url, key)
        assert not isinstance(caught.value.__cause__, StoreError)
    if backend.kind == "file":
        assert not (tmp_path / "no-such-disk").exists()  # never created: not a mount point


def test_large_object(backend: Backend, tmp_path: Path, large_file: Path) -> None:
    url = backend.new_bucket()
    store = backend.open(url)
    store.put("big.enc", large_file)
    assert store.list() == [StoredObject("big.enc", LARGE)]
    store.get("big.enc", tmp_path / "back")
    assert _digest(tmp_path / "back") == _digest(large_file)
    if backend.kind == "s3":
        # It went up as a multipart upload of 4 parts of 5 MiB (an ETag "<md5>-<parts>").
        head = _s3_admin(backend.endpoint).head_object(Bucket=url[5:], Key="big.enc")
        assert head["ETag"].strip('"').endswith("-4")


# --- interrupted uploads ------------------------------------------------------------------------


class CutProxy:
    """A loopback TCP proxy to ``target`` that, once ``cut_after(budget)`` bytes have gone
    upstream in all, ends every connection (mid-request) and refuses every new one."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.budget: int | None = None
        self.sent = 0
        self.cut = threading.Event()
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, budget: int) -> None:
        with self.lock:
            self.budget, self.sent = budget, 0
            self.cut.clear()

    def close(self) -> None:
        _reset(self.listener)  # shutdown() wakes the accept() thread, close() alone would not
        self._reset_all()

    def _reset_all(self) -> None:
        with self.lock:
            socks, self.open = list(self.open), set()
        for s in socks:
            _reset(s)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self.lock:
                self.open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self.lock:
                        allowed = len(data)
                        if self.budget is not None:
                            allowed = max(0, min(allowed, self.budget - self.sent))
                            self.sent += allowed
                    if allowed < len(data):
                        dst.sendall(data[:allowed])
                        self.cut.set()
                        self._reset_all()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # A clean end of one direction ends the other too (HTTP/1.1 needs no half-close).
            with self.lock:
                self.open.discard(src)
                self.open.discard(dst)
            _reset(src)
            _reset(dst)


def _reset(sock: socket.socket) -> None:
    """End a connection now, even one another thread is blocked on: shutdown() wakes that
    thread and sends FIN (the peer reads a body that stops short, as when a process dies),
    close() with SO_LINGER 0 then aborts it (RST)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@pytest.fixture
def proxy(remote: Backend) -> Iterator[CutProxy]:
    p = CutProxy(remote.endpoint)
    yield p
    p.close()


@pytest.mark.parametrize("remote", ["s3", "gs"], indirect=True)
@pytest.mark.parametrize("size", [1 * MiB, LARGE], ids=["one-request", "multipart"])
def test_interrupted_put_leaves_nothing(
    remote: Backend, proxy: CutProxy, tmp_path: Path, large_file: Path, size: int
) -> None:
    url = remote.new_bucket()
    direct = remote.open(url)
    src = large_file if size == LARGE else _file(tmp_path, "src", os.urandom(size))
    # An earlier, complete object under another key, and one under the key itself.
    old = _file(tmp_path, "old", b"the previous complete version")
    direct.put("kept", old)
    direct.put("replaced", old)
    through = remote.open(url, endpoint=proxy.endpoint)
    for key in ("new", "replaced"):
        proxy.cut_after(size // 2)
        with pytest.raises(StoreError) as caught:
            through.put(key, src)
        _named(caught.value, url, key)
        assert proxy.cut.is_set()
    # Nothing new is visible; what was complete before still is, with its old content.
    size = len(old.read_bytes())
    assert direct.list() == [StoredObject("kept", size), StoredObject("replaced", size)]
    with pytest.raises(StoreError, match="no such object"):
        direct.get("new", tmp_path / "out")
    direct.get("replaced", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == old.read_bytes()


def test_interrupted_put_file_backend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, large_file: Path
) -> None:
    """file://: the disk fails (EIO at fsync, as an external disk does) after the data went
    to the temporary file: nothing under the key, no temporary file left."""
    backend = Backend("file", "", tmp_path)
    url = backend.new_bucket()
    store = backend.open(url)
    store.put("replaced", _file(tmp_path, "old", b"old"))

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    for key in ("new", "replaced"):
        with pytest.raises(StoreError, match="Input/output error") as caught:
            store.put(key, large_file)
        _named(caught.value, url, key)
    monkeypatch.undo()
    assert store.list() == [StoredObject("replaced", 3)]
    root = Path(url.removeprefix("file://"))
    assert list((root / ".partial").iterdir()) == []


# --- dead servers, bad credentials --------------------------------------------------------------


def _every_operation_fails(store: Store, url: str, tmp_path: Path) -> None:
    src = _file(tmp_path, "src", b"x" * 100)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("k1", lambda: store.put("k1", src)),
        ("k2", lambda: store.get("k2", tmp_path / "out")),
        ("k3", lambda: store.delete("k3")),
        ("pre/", lambda: store.list("pre/")),
    ]
    for key, call in calls:
        with pytest.raises(StoreError) as caught:
            call()
        _named(caught.value, url, key)


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_server_down(kind: str, tmp_path: Path) -> None:
    """The server stops mid-test: every operation is a StoreError naming bucket and key."""
    if kind == "s3":
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
    else:
        server, endpoint = _start_gcs()
    backend = Backend(kind, endpoint, tmp_path)
    url = backend.new_bucket()
    store = backend.open(url)
    store.put("k2", _file(tmp_path, "a", b"there"))
    server.stop()
    if kind == "s3":
        # ThreadedMotoServer.stop() ends serve_forever but leaves the socket listening.
        server._server.server_close()
    _every_operation_fails(store, url, tmp_path)


def test_s3_bad_credentials(s3_endpoint: str, tmp_path: Path) -> None:
    """moto checks signatures against its IAM users once /moto-api/reset-auth says so."""
    backend = Backend("s3", s3_endpoint, tmp_path)
    url = backend.new_bucket()

    def auth(after: str) -> None:
        # text/plain: a form content type would leave Flask's request.data empty.
        request = urllib.request.Request(
            f"{s3_endpoint}/moto-api/reset-auth",
            data=after.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()

    auth("0")
    try:
        store = backend.open(url)
        _every_operation_fails(store, url, tmp_path)
        with pytest.raises(StoreError, match="InvalidAccessKeyId"):
            store.list()
    finally:
        auth("inf")
    backend.open(url).list()  # and back to normal


class _TokenEndpoint(http.server.BaseHTTPRequestHandler):
    """Google's token endpoint refusing the refresh token, as it does a revoked one."""

    requests: list[dict[str, list[str]]] = []  # noqa: RUF012 - one test's record

    def do_POST(self) -> None:
        from urllib.parse import parse_qs

        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        type(self).requests.append(parse_qs(body))
        reply = json.dumps({"error": "invalid_grant", "error_description": "Token revoked"})
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_gs_bad_credentials(gcs_endpoint: str, tmp_path: Path) -> None:
    """The emulator takes any credentials, so the refusal comes from a loopback stand-in for
    Google's token endpoint: the refresh token credentials fail to refresh."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        backend = Backend("gs", gcs_endpoint, tmp_path)
        url = backend.new_bucket()
        settings = Settings(
            backup_bucket=url,
            backup_gcs_endpoint=gcs_endpoint,
            boto_gs_oauth2_refresh_token="1//revoked-token",
            boto_default_project_id="my-project",
        )
        creds, project = backends.gcs_credentials(settings)
        creds = creds.with_token_uri(f"http://127.0.0.1:{httpd.server_port}/token")
        client = gcs_storage.Client(
            project=project, credentials=creds, client_options={"api_endpoint": gcs_endpoint}
        )
        store = backends.GCSStore(url[5:], "", url, client, FAST)
        _every_operation_fails(store, url, tmp_path)
        with pytest.raises(StoreError, match="invalid_grant"):
            store.put("k", _file(tmp_path, "src", b"x"))
        sent = _TokenEndpoint.requests[0]
        assert sent["grant_type"] == ["refresh_token"]
        assert sent["refresh_token"] == ["1//revoked-token"]
        assert sent["client_id"] == [GSUTIL_CLIENT_ID]
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- credentials and URLs (no server) ------------------------------------------------------------


def test_gs_refresh_token_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed's boto keys become gsutil's user credentials; nothing is refreshed."""
    from google.oauth2.credentials import Credentials

    def no_default(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("google.auth.default must not be consulted")

    monkeypatch.setattr("google.auth.default", no_default)
    settings = Settings(
        backup_bucket="gs://my-mail-backup/host1",
        boto_gs_oauth2_refresh_token="1//0refresh-token",
        boto_default_project_id="my-project",
    )
    creds, project = backends.gcs_credentials(settings)
    assert isinstance(creds, Credentials)
    assert creds.refresh_token == "1//0refresh-token"
    assert creds.client_id == GSUTIL_CLIENT_ID == "909320924072.apps.googleusercontent.com"
    assert creds.client_secret == GSUTIL_CLIENT_SECRET
    assert creds.token_uri == "https://oauth2.googleapis.com/token"
    assert creds.token is None and not creds.valid  # not refreshed: Google was not asked
    assert project == "my-project"
    store = backends.open_store(settings)
    assert isinstance(store, backends.GCSStore)
    used = store.client._credentials  # the client's copy, with its scopes added
    assert isinstance(used, Credentials) and used.refresh_token == "1//0refresh-token"
    assert used.client_id == GSUTIL_CLIENT_ID and not used.valid
    assert store.client.project == "my-project"
    assert store.prefix == "host1/"


def test_gs_credentials_with_an_emulator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from google.auth.credentials import AnonymousCredentials

    def no_default(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("google.auth.default (and its metadata server) must not be used")

    import google.auth

    real_default = google.auth.default
    monkeypatch.setattr("google.auth.default", no_default)
    settings = Settings(backup_bucket="gs://b-1", backup_gcs_endpoint="http://127.0.0.1:9")
    creds, project = backends.gcs_credentials(settings)
    assert isinstance(creds, AnonymousCredentials)
    assert project is None
    # An explicit key file is used, even with an endpoint (a private GCS endpoint): default()
    # takes GOOGLE_APPLICATION_CREDENTIALS first and stops there.
    monkeypatch.setattr("google.auth.default", real_default)
    key = tmp_path / "user.json"
    key.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": "id.apps.googleusercontent.com",
                "client_secret": "s",
                "refresh_token": "1//file-token",
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    creds, _ = backends.gcs_credentials(settings)
    assert getattr(creds, "refresh_token", None) == "1//file-token"


def test_gs_standard_credentials_without_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from google.auth.credentials import AnonymousCredentials

    sentinel = AnonymousCredentials()
    monkeypatch.setattr("google.auth.default", lambda *a, **k: (sentinel, "adc-project"))
    creds, project = backends.gcs_credentials(Settings(backup_bucket="gs://b-1"))
    assert creds is sentinel and project == "adc-project"

    def none_found(*args: Any, **kwargs: Any) -> Any:
        import google.auth.exceptions

        raise google.auth.exceptions.DefaultCredentialsError("no credentials anywhere")

    monkeypatch.setattr("google.auth.default", none_found)
    with pytest.raises(StoreError, match="gs://b-1: no Google Cloud credentials"):
        backends.open_store(Settings(backup_bucket="gs://b-1"))


def test_s3_without_endpoint_never_leaves_loopback(tmp_path: Path) -> None:
    """No endpoint means AWS itself: here the guard refuses it, and that is a StoreError."""
    with pytest.raises(OSError, match="test guard"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    with pytest.raises(OSError, match="test guard"):
        socket.getaddrinfo("s3.amazonaws.com", 443)
    store = backends.open_store(Settings(backup_bucket="s3://some-bucket"), FAST)
    with pytest.raises(StoreError, match="some-bucket"):
        store.list()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "backup_bucket is not set"),
        ("ftp://host/x", "must be an s3://, gs:// or file:/// URL"),
        ("file://relative/dir", "absolute path"),
        ("s3://Bad_Bucket", "not a bucket name"),
        ("gs://bucket/a//b", "prefix must be"),
        ("s3://bucket/../x", "prefix must be"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        backends.open_store(Settings(backup_bucket=url))


def test_open_url_file(tmp_path: Path) -> None:
    store = open_url(f"file://{tmp_path}", Settings())
    assert isinstance(store, backends.FileStore)
    assert store.url == f"file://{tmp_path}"
