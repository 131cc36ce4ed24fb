"""A Ray Serve fleet for the tests (serverproc.FleetProcess, which starts it as `make serve-ray` does), and
calls through its gRPC proxy that say which replica answered.

Importing this skips the importing test module where Ray Serve is not installed, and fails it under CI.
"""

import functools
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.util import find_spec

import grpc
import pytest

from models import affinity_key
from serverproc import FleetProcess
from stubs import pb2, pb2_grpc
from tests.fixtures import run_concurrently

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


@dataclass
class Churn:
    """What Predict callers saw while changes kept coming: the last change in force, and every stale answer
    (older than the last change that had returned before the call started) and every error."""

    in_force: float
    stale: list[tuple[float, list[float], float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answers: Counter[float] = field(default_factory=Counter)


def predict_during_changes(
    fleet: Fleet,
    change: Callable[[float], None],
    versions: Sequence[float],
    *,
    in_force: float,
    callers: int,
    draw_row: Callable[[random.Random], list[float]],
    least_answer: Callable[[list[float], float], float],
) -> Churn:
    """`callers` threads Predict rows from `draw_row` (half with affinity, half without) while one thread
    applies `change(version)` for each of `versions` in turn. An answer below `least_answer(X, version)`,
    for the last version whose change had returned when the call started, is stale."""
    churn = Churn(in_force)
    done = threading.Event()

    def keep_changing():
        try:
            for version in versions:
                change(version)
                churn.in_force = version
        finally:
            done.set()

    def keep_predicting(seed: int):
        rows = random.Random(seed)
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:
            floor = churn.in_force  # read before the call starts
            X = draw_row(rows)
            try:
                reply, _ = predict(fleet, X, affinity=seed % 2 == 0)
            except grpc.RpcError as error:
                churn.errors.append(f"{error.code().name}: {error.details()}")
                continue
            if reply.error:
                churn.errors.append(reply.error)
            elif reply.y < least_answer(X, floor):
                churn.stale.append((floor, X, reply.y))
            churn.answers[reply.y] += 1

    callers_tasks = [functools.partial(keep_predicting, seed) for seed in range(callers)]
    run_concurrently([keep_changing, *callers_tasks], 180)
    return churn
