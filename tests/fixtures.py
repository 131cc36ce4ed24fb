"""Fixtures and helpers every test module shares (loaded by conftest.py): a real server.py process, stubs."""

import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from serverproc import start_server
from stubs import pb2, pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CALL_DEADLINE = 5.0  # seconds any single test call may take; a hung server fails the test instead of hanging it


def predict(stub: pb2_grpc.ModelServerStub, *x: float, timeout: float = CALL_DEADLINE) -> pb2.PredictResponse:
    return stub.Predict(pb2.PredictRequest(X=x), timeout=timeout)


def run_concurrently(tasks: Iterable[Callable[[], None]], timeout: float = 60) -> None:
    """Run each task in its own thread, all at once, and wait for them (bounded by `timeout`)."""
    threads = [threading.Thread(target=task) for task in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"tasks still running after {timeout} s"


@pytest.fixture(scope="module")
def server():
    with start_server() as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb2_grpc.ModelServerStub(channel)


@pytest.fixture
def coefs_123(stub):
    """Coefficients [1, 2, 3] freshly set, so the cache starts empty."""
    assert stub.SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3])).error == ""


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1, and its key: (cert.pem, key.pem)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def train_example(script: str, path: Path) -> Path:
    """Run one of examples/train_*.py to make a model file at `path`, as the README tells a user to."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return path
