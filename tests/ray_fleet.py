"""A Ray Serve fleet for the tests, started and stopped by deploy/ray/fleet.py as `make serve-ray` does,
on free ports and a Ray folder of its own; and calls through its gRPC proxy that say which replica answered.

Importing this skips the importing test module where Ray Serve is not installed, and fails it under CI.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import grpc
import pytest

from models import affinity_key
from serverproc import free_port
from stubs import pb2, pb2_grpc
from tests.fixtures import ROOT

if find_spec("ray") is None:
    if os.environ.get("CI"):
        pytest.fail("Ray Serve is not installed, and CI must run its tests: make setup-ray", pytrace=False)
    pytest.skip("Ray Serve is not installed (make setup-ray installs requirements-ray.txt)", allow_module_level=True)

FLEET = [sys.executable, str(ROOT / "deploy" / "ray" / "fleet.py")]
REPLICAS = 2
CACHE_SIZE = 10  # per replica, deploy/ray/serve.yaml's
FLEET_START_TIMEOUT = 300  # seconds: Ray, Serve, its proxies and the replicas on 2 busy cores
CALL_TIMEOUT = 30.0  # a call through the proxy, which may wait for a replica being replaced


@dataclass
class Fleet:
    grpc_port: int
    channel: grpc.Channel

    @property
    def stub(self) -> pb2_grpc.ModelServerStub:
        return pb2_grpc.ModelServerStub(self.channel)


@contextmanager
def running_fleet(options: Sequence[str] = ()) -> Iterator[Fleet]:
    """`fleet.py up` with REPLICAS replicas; `fleet.py down` afterwards, whatever happened."""
    grpc_port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths live under it
    up = [*FLEET, "up", f"--replicas={REPLICAS}", f"--grpc-port={grpc_port}", f"--http-port={free_port()}"]
    try:
        started = subprocess.run(
            [*up, f"--gcs-port={free_port()}", f"--temp-dir={temp_dir}", *options],
            capture_output=True,
            text=True,
            timeout=FLEET_START_TIMEOUT,
            check=False,
        )
        assert started.returncode == 0, started.stderr[-3000:]
        assert f"gRPC proxy listens on port {grpc_port}" in started.stdout.splitlines()[-1]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            yield Fleet(grpc_port, channel)
    finally:
        subprocess.run([*FLEET, "down"], capture_output=True, timeout=120, check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


def set_coefs(fleet: Fleet, coefs: Sequence[float]) -> None:
    assert fleet.stub.SetCoefs(pb2.SetCoefsRequest(coefs=coefs), timeout=CALL_TIMEOUT).error == ""


def predict(fleet: Fleet, X: Sequence[float], *, affinity: bool = True) -> tuple[pb2.PredictResponse, str]:
    """Predict through the proxy, with the row's affinity key or without; returns the answer and its replica."""
    metadata = (("session_id", affinity_key(X)),) if affinity else None
    reply, call = fleet.stub.Predict.with_call(pb2.PredictRequest(X=X), metadata=metadata, timeout=CALL_TIMEOUT)
    return reply, dict(call.trailing_metadata())["replica"]
