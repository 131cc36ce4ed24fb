"""Fixtures shared by the test modules: a real server.py process and stubs to call it."""
import socket
from pathlib import Path

import pytest

from serverproc import start_server
from stubs import pb2, pb2_grpc

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared"


def free_port() -> int:
    """A port nobody listens on now, for a server that must start after its client."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
