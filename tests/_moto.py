"""A real moto S3 server over HTTP on 127.0.0.1, with a request log and fault injection.

Import the fixtures into a test module::

    from ._moto import moto_server, s3_bucket, s3_env  # noqa: F401

``moto_server`` (one per session) is moto's ``ThreadedMotoServer`` on a free
port, its WSGI app wrapped by :class:`Recorder` so tests can count the
requests a store made and make chosen requests fail or stall.
"""

from __future__ import annotations

import io
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

REGION = "us-east-1"
KEY = "testing"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    #: The request's headers, names in lower case.
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)

    @property
    def is_write(self) -> bool:
        return self.method in ("PUT", "POST")

    @property
    def is_upload_part(self) -> bool:
        return self.method == "PUT" and "uploadId=" in self.query and "partNumber=" in self.query


@dataclass
class Fault:
    """Answer matching requests with ``status``/``code`` instead of passing them on."""

    match: Callable[[Request], bool]
    status: int
    code: str
    times: int  # how many matching requests fail; -1 for all
    delay: float = 0.0  # seconds to stall each matching request before answering
    #: Set when the first matching request arrives.
    seen: threading.Event = field(default_factory=threading.Event)


@dataclass
class Recorder:
    """WSGI middleware: logs every request, applies faults, then calls moto."""

    app: WSGIApp
    log: list[Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        headers = tuple(
            (k[5:].replace("_", "-").lower(), str(v))
            for k, v in environ.items()
            if k.startswith("HTTP_")
        )
        req = Request(
            environ["REQUEST_METHOD"],
            environ.get("PATH_INFO", ""),
            environ.get("QUERY_STRING", ""),
            headers,
        )
        with self.lock:
            self.log.append(req)
            fault = next((f for f in self.faults if f.times != 0 and f.match(req)), None)
            if fault is not None and fault.times > 0:
                fault.times -= 1
        if fault is None:
            return self.app(environ, start_response)
        fault.seen.set()
        # Read the whole body first: the server is slow to answer, not to read,
        # and the client's keep-alive connection stays usable after a fault.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body_in = environ["wsgi.input"].read(length) if length else b""
        if fault.delay:
            time.sleep(fault.delay)
        if fault.status < 400:
            environ["wsgi.input"] = io.BytesIO(body_in)
            return self.app(environ, start_response)
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
            f"<Message>injected {fault.code}</Message></Error>"
        ).encode()
        start_response(
            f"{fault.status} Injected",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )
        return [body]


class MotoServer:
    """A running moto server: ``endpoint``, the request log and fault injection."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        # The WSGI server looks its app up per request, so wrapping it now
        # (before any request) puts the recorder in front of every request.
        wsgi = self._server._server
        assert wsgi is not None
        self.recorder = Recorder(wsgi.app)
        wsgi.app = self.recorder

    def stop(self) -> None:
        self._server.stop()

    def mark(self) -> int:
        """A position in the request log, for :meth:`since`."""
        with self.recorder.lock:
            return len(self.recorder.log)

    def since(self, mark: int) -> list[Request]:
        with self.recorder.lock:
            return list(self.recorder.log[mark:])

    def fail(
        self,
        match: Callable[[Request], bool] | str,
        *,
        status: int = 503,
        code: str = "SlowDown",
        times: int = 1,
        delay: float = 0.0,
    ) -> Fault:
        """Make the next ``times`` requests matching ``match`` fail (a regex over "METHOD path?query")."""
        match_fn: Callable[[Request], bool]
        if isinstance(match, str):
            pattern = re.compile(match)

            def match_fn(r: Request) -> bool:
                return bool(pattern.search(f"{r.method} {r.path}?{r.query}"))

        else:
            match_fn = match
        fault = Fault(match_fn, status, code, times, delay)
        with self.recorder.lock:
            self.recorder.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.recorder.lock:
            self.recorder.faults.clear()

    def client(self) -> Any:
        """A plain boto3 S3 client for setting up and inspecting buckets."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=KEY,
            aws_secret_access_key=KEY,
        )


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Standard AWS environment for the moto server; nothing from the real machine."""
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_bucket(moto_server: MotoServer, s3_env: None) -> Iterator[str]:
    """A fresh, empty bucket; its objects are deleted afterwards to free moto's memory."""
    name = f"shoal-{uuid.uuid4().hex[:12]}"
    client = moto_server.client()
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        moto_server.clear_faults()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", ()):
                client.delete_object(Bucket=name, Key=item["Key"])
        client.close()
