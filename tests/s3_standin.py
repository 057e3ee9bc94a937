"""An S3 stand-in for the tests: moto's server mode in a process of its own on 127.0.0.1
(so the clients it serves, killed or not, are separate processes, and moto's own warnings
stay out of pytest's), filled with plain HTTP PUTs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from .conftest import clean_env

_SERVE = """\
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop()
"""

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_standin() -> Iterator[tuple[str, dict[str, str]]]:
    """Moto's S3 on a free port: its URL, and the environment a client reaches it with."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url, clean_env(AWS_ENDPOINT_URL=url, **CREDENTIALS)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def put(endpoint: str, path: str, data: bytes = b"") -> None:
    """Create a bucket (``path`` without a slash) or an object (``bucket/key``)."""
    # (urllib's default type, a form, would have the server parse the body as one)
    headers = {"Content-Type": "application/octet-stream"}
    request = urllib.request.Request(f"{endpoint}/{path}", data=data, headers=headers, method="PUT")
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200, reply.status
