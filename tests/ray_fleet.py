"""A Ray Serve fleet for the tests (serverproc.FleetProcess, which starts it as `make serve-ray` does), and
calls through its gRPC proxy that say which replica answered.

Importing this skips the importing test module where Ray Serve is not installed, and fails it under CI.
"""

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec

import grpc
import pytest

from models import affinity_key
from serverproc import FleetProcess
from stubs import pb2, pb2_grpc

if find_spec("ray") is None:
    if os.environ.get("CI"):
        pytest.fail("Ray Serve is not installed, and CI must run its tests: make setup-ray", pytrace=False)
    pytest.skip("Ray Serve is not installed (make setup-ray installs requirements-ray.txt)", allow_module_level=True)

REPLICAS = 2
CACHE_SIZE = 10  # per replica, deploy/ray/serve.yaml's
CALL_TIMEOUT = 30.0  # a call through the proxy, which may wait for a replica being replaced


@dataclass
class Fleet:
    grpc_port: int
    channel: grpc.Channel

    @property
    def stub(self) -> pb2_grpc.ModelServerStub:
        return pb2_grpc.ModelServerStub(self.channel)


@contextmanager
def running_fleet(options: Sequence[str] = (), env: dict | None = None) -> Iterator[Fleet]:
    """REPLICAS replicas, stopped afterwards whatever happened."""
    with FleetProcess(REPLICAS, options, env) as fleet:
        assert f"gRPC proxy listens on port {fleet.port}" in fleet.ready_line
        with grpc.insecure_channel(fleet.address) as channel:
            yield Fleet(fleet.port, channel)


def set_coefs(fleet: Fleet, coefs: Sequence[float]) -> None:
    assert fleet.stub.SetCoefs(pb2.SetCoefsRequest(coefs=coefs), timeout=CALL_TIMEOUT).error == ""


def predict(fleet: Fleet, X: Sequence[float], *, affinity: bool = True) -> tuple[pb2.PredictResponse, str]:
    """Predict through the proxy, with the row's affinity key or without; returns the answer and its replica."""
    metadata = (("session_id", affinity_key(X)),) if affinity else None
    reply, call = fleet.stub.Predict.with_call(pb2.PredictRequest(X=X), metadata=metadata, timeout=CALL_TIMEOUT)
    return reply, dict(call.trailing_metadata())["replica"]
