"""Real servers on loopback for the object-store tests and the benchmark (all
but Azurite count, at the server, the requests and body bytes sent per object):

- :func:`moto_s3`: moto's S3 server (its WSGI application, served by werkzeug
  as ``moto_server`` serves it), wrapped in a counting middleware;
- :class:`RangeServer`: an HTTP server of ours that honours ``Range`` (one
  range, ``bytes=A-B``, ``A-`` and ``-N``; 206 with ``Content-Range``, 416 when
  unsatisfiable), serving a directory; names under ``forbidden/`` answer 403,
  under ``broken/`` 503; ``delay`` seconds before each answer emulate a store's latency;
- :class:`NoRangeServer`: Python's own ``http.server``, which ignores
  ``Range`` and sends the whole file with 200;
- :class:`SilentServer`: accepts connections and never answers (timeouts);
- :class:`Azurite`: Microsoft's Azure Blob emulator, when ``azurite-blob`` is installed.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

S3_REGION = "us-east-1"
#: Credentials moto accepts (any): set in the environment of the code under test.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": S3_REGION}


class Counts:
    """Requests and body bytes per object path, as the server saw them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()

    def add(self, path: str, requests: int = 0, sent: int = 0) -> None:
        with self.lock:
            self.requests[path] += requests
            self.sent[path] += sent

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()
            self.sent.clear()


class _Counting:
    """WSGI middleware: counts each request and the body bytes of its answer by path."""

    def __init__(self, app, counts: Counts) -> None:
        self.app, self.counts = app, counts

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        self.counts.add(path, requests=1)
        for chunk in self.app(environ, start_response):
            self.counts.add(path, sent=len(chunk))
            yield chunk


class MotoS3:
    """A running moto S3 server: ``endpoint``, ``counts`` and a boto3 ``client``."""

    def __init__(self, endpoint: str, counts: Counts) -> None:
        import boto3

        self.endpoint, self.counts = endpoint, counts
        self.client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=S3_REGION,
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )


@contextmanager
def s3_credentials() -> Iterator[None]:
    """:data:`S3_ENV` in the environment for the block's duration (what a client
    of a moto server needs), the variables as they were restored after."""
    saved = {key: os.environ.get(key) for key in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """moto's S3 server on 127.0.0.1, a free port, threaded, for the block's duration."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class _QuietWSGI(WSGIRequestHandler):
        def log_request(self, *args, **kwargs) -> None:
            pass

    counts = Counts()
    app = _Counting(DomainDispatcherApplication(create_backend_app), counts)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietWSGI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield MotoS3(f"http://127.0.0.1:{server.server_port}", counts)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    counts: Counts
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as written, not 40 ms apart

    def log_message(self, *args) -> None:
        pass

    def _count_request(self) -> str:
        path = self.path.split("?", 1)[0]
        self.counts.add(path, requests=1)
        return path


class _IgnoresRange(_Quiet):
    """``http.server`` as it is (no Range), counting the body bytes it manages to send."""

    protocol_version = "HTTP/1.0"

    def send_head(self):
        self._count_request()
        return super().send_head()

    def copyfile(self, source, outputfile) -> None:
        path = self.path.split("?", 1)[0]
        try:
            while chunk := source.read(64 * 1024):
                outputfile.write(chunk)
                self.counts.add(path, sent=len(chunk))
        except OSError:  # the client went away: what it refused is not sent
            pass


_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _HonoursRange(_Quiet):
    """One byte range per request, as a static file server answers it."""

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    delay = 0.0  # seconds before each answer: a store's time to first byte

    def _serve(self, body: bool) -> None:
        path = self._count_request()
        if self.delay:
            time.sleep(self.delay)
        if path.startswith("/forbidden/"):
            return self._empty(403)
        if path.startswith("/broken/"):
            return self._empty(503)
        file = Path(self.translate_path(path))
        if not file.is_file():
            return self._empty(404)
        size = file.stat().st_size
        start, end, status = 0, size, 200
        asked = self.headers.get("Range")
        if asked:
            match = _RANGE.match(asked.strip())
            if match is None or match.groups() == ("", ""):
                return self._empty(416, size)
            first, last = match.groups()
            if first == "":
                start, end = max(0, size - int(last)), size
            else:
                start, end = int(first), size if last == "" else min(size, int(last) + 1)
            if start >= size or (first != "" and last != "" and int(last) < int(first)) or end <= start:
                return self._empty(416, size)
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", self.date_time_string(int(file.stat().st_mtime)))
        self.send_header("ETag", f'"{file.stat().st_mtime_ns:x}-{size:x}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if body:
            with file.open("rb") as f:
                f.seek(start)
                data = f.read(end - start)
            self.wfile.write(data)
            self.counts.add(path, sent=len(data))

    def _empty(self, status: int, size: int | None = None) -> None:
        self.send_response(status)
        if size is not None:
            self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Threading(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 drops connections a concurrent client opens at once


class _HTTPServer:
    handler: type[_Quiet]

    def __init__(self, directory: str | os.PathLike[str], delay: float = 0.0) -> None:
        self.counts = Counts()
        handler = type("Handler", (self.handler,), {"counts": self.counts, "delay": delay})
        self.server = _Threading(("127.0.0.1", 0), functools.partial(handler, directory=os.fspath(directory)))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class RangeServer(_HTTPServer):
    """Serves ``directory`` honouring Range; ``url`` is its root."""

    handler = _HonoursRange


class NoRangeServer(_HTTPServer):
    """Serves ``directory`` with ``http.server``, which ignores Range."""

    handler = _IgnoresRange


class SilentServer:
    """A listening socket that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def __enter__(self) -> SilentServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_tree(files: dict[str, bytes], root: Path) -> None:
    """Write ``files`` (name -> bytes) under ``root``."""
    shutil.rmtree(root, ignore_errors=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


class Azurite:
    """Microsoft's Azure Blob emulator (``azurite-blob``, from npm) in memory on a
    free port, with its well-known development account; ``endpoint`` is the
    account's URL, as ``--endpoint-url`` takes it."""

    ACCOUNT = "devstoreaccount1"
    KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
    #: The environment a client reads the account from (object_store's names).
    ENV = {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": KEY}

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{self.ACCOUNT}"

    def __enter__(self) -> Azurite:
        self.process = subprocess.Popen(
            ["azurite-blob", "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence",
             "--silent", "--disableTelemetry", "--skipApiVersionCheck", "--loose"],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.process.kill()
        raise RuntimeError("azurite-blob did not start")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait()

    def create_container(self, name: str) -> None:
        """``Create Container``, signed with the account key (Shared Key authorization)."""
        import base64
        import hashlib
        import hmac
        import urllib.request
        from email.utils import formatdate

        headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
        signed = "PUT\n" + "\n" * 11 + "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
        signed += f"/{self.ACCOUNT}/{self.ACCOUNT}/{name}\nrestype:container"
        mac = hmac.new(base64.b64decode(self.KEY), signed.encode(), hashlib.sha256).digest()
        headers["Authorization"] = f"SharedKey {self.ACCOUNT}:{base64.b64encode(mac).decode()}"
        request = urllib.request.Request(
            f"{self.endpoint}/{name}?restype=container", method="PUT", headers={**headers, "Content-Length": "0"}
        )
        urllib.request.urlopen(request).close()

    def put(self, container: str, key: str, data: bytes) -> None:
        import obstore
        from obstore.store import AzureStore

        store = AzureStore(
            container, account_name=self.ACCOUNT, access_key=self.KEY, endpoint=self.endpoint,
            client_options={"allow_http": True},
        )
        obstore.put(store, key, data)
