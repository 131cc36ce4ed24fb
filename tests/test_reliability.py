"""Trust under pressure: concurrency, bad input, faults, the admin token and TLS, against real server.py."""

import functools
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from serverproc import start_server
from stubs import pb2, pb2_grpc
from tests.fixtures import CALL_DEADLINE, ROOT, predict, run_concurrently

TOKEN = "tok-9f2c4e"


def test_16_clients_only_ever_see_coefficients_in_force_during_their_call(server, stub):
    """Version k has coefs [k, k, k]; X = [a, 0, 0] answers k * a, so every answer names its version."""
    returned, begun = [0], [0]
    problems: list[str] = []
    stop = threading.Event()
    stub.SetCoefs(pb2.SetCoefsRequest(coefs=[0, 0, 0]))

    def writer():
        version = 0
        while not stop.is_set() and version < 2000:
            version += 1
            begun[0] = version
            assert stub.SetCoefs(pb2.SetCoefsRequest(coefs=[version] * 3), timeout=CALL_DEADLINE).error == ""
            returned[0] = version

    def reader(seed):
        chooser = random.Random(seed)
        for _ in range(400):
            if stop.is_set():
                return
            a = chooser.choice([1, 2, 4])
            oldest, started = returned[0], time.monotonic()
            try:
                reply = predict(stub, a, 0, 0)
            except grpc.RpcError as error:
                problems.append(f"{error.code().name}: {error.details()}")
                continue
            newest, took = begun[0], time.monotonic() - started
            version = reply.y / a
            if reply.error or not oldest <= version <= newest or took > CALL_DEADLINE:
                problems.append(f"X=[{a},0,0] gave {reply}, allowed versions {oldest}..{newest}, took {took:.2f} s")

    writer_thread = threading.Thread(target=writer)
    writer_thread.start()
    try:
        run_concurrently((functools.partial(reader, n) for n in range(16)), timeout=30)
    finally:
        stop.set()
        writer_thread.join(timeout=10)
    assert problems == []
    assert returned[0] > 10, "SetCoefs hardly ran: the test proved nothing"


@pytest.mark.parametrize(
    "x, error",
    [
        ((1.0,), "1 values per row but the model takes 3"),
        ((1.0,) * 7, "7 values per row but the model takes 3"),
        ((), "X is empty"),
    ],
)
def test_malformed_x_is_an_error_string(stub, coefs_123, x, error):
    assert error in predict(stub, *x).error


INF = float("inf")


@pytest.mark.parametrize(
    "x, check",
    [
        ((float("nan"), 0, 0), math.isnan),
        ((INF, 0, 0), lambda y: y == INF),
        ((-INF, 0, 0), lambda y: y == -INF),
        ((1e39, 0, 0), lambda y: y == INF),  # beyond float32: the wire carries inf
        ((-1e39, 0, 0), lambda y: y == -INF),
        ((3.4e38, 3.4e38, 0), lambda y: y == INF),  # finite inputs whose sum overflows float32
    ],
)
def test_non_finite_and_overflowing_values_are_answered_not_crashed_on(stub, coefs_123, x, check):
    reply = predict(stub, *x)
    assert reply.error == "" and check(reply.y)
    assert predict(stub, 1, 2, 3).y == 14.0


def test_a_5_mb_request_is_resource_exhausted_and_the_server_carries_on(stub, coefs_123):
    with pytest.raises(grpc.RpcError) as error:
        predict(stub, *([1.0] * (5 * 1024 * 1024 // 4)))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert predict(stub, 1, 2, 3).y == 14.0


def test_max_message_mb_sets_the_limit():
    with start_server(["--max-message-mb", "0.5"]) as small, small.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            predict(stub, *([1.0] * (1024 * 1024 // 4)))
        small_but_wrong = predict(stub, *([1.0] * 1000))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert small_but_wrong.error == "no model yet: call SetCoefs first"


def test_thousands_of_bad_requests_among_good_ones_leave_answers_and_counters_right(server, stub, coefs_123):
    before = stub.GetStats(pb2.GetStatsRequest())
    wrong: list[str] = []
    bad_requests = [(), (1.0,), (1.0, 2.0), (1.0,) * 4, (float("nan"),) * 5]

    def client(worker):
        for i in range(500):
            bad = bad_requests[i % len(bad_requests)]
            if not predict(stub, *bad).error:
                wrong.append(f"{bad} got no error")
            x = (worker, i % 2, 0)  # 8 distinct inputs in all: they fit in the cache
            reply = predict(stub, *x)
            if reply.error or reply.y != worker + 2 * (i % 2):
                wrong.append(f"{x} gave {reply}")

    run_concurrently(functools.partial(client, worker) for worker in range(4))
    after = stub.GetStats(pb2.GetStatsRequest())
    assert wrong == []
    assert (after.hits + after.misses) - (before.hits + before.misses) == 4 * 500  # only the good ones count
    assert after.misses - before.misses == 8  # each distinct input missed once
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


class Slow(nn.Module):
    """Takes about a second per call, so a call can be caught in flight."""

    input_width: int

    def __init__(self):
        super().__init__()
        self.input_width = 3

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        start = torch.zeros(1)
        for _ in range(200):
            start = start + torch.ones(300, 300).matmul(torch.ones(300, 1)).sum() * 0
        return X.sum(dim=1) + start


def test_sigterm_under_load_finishes_in_flight_calls_refuses_new_ones_and_exits_0(tmp_path):
    model = tmp_path / "slow.pt"
    torch.jit.script(Slow()).save(str(model))
    server = start_server(["--model", str(model), "--grace", "8"])
    with server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        in_flight = [stub.Predict.future(pb2.PredictRequest(X=[i, 2, 3]), timeout=30) for i in range(4)]
        deadline = time.monotonic() + 20
        while stub.GetStats(pb2.GetStatsRequest()).misses < len(in_flight) and time.monotonic() < deadline:
            time.sleep(0.01)  # a miss is counted as its computation starts
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(pb2.PredictRequest(X=[9, 9, 9]), timeout=5)
        answers = [call.result().y for call in in_flight]
    assert answers == [5.0, 6.0, 7.0, 8.0]
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)  # refused either way
    assert server.process.wait(timeout=15) == 0


# --- the admin token ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded():
    """A server whose SetCoefs needs TOKEN, given through the environment."""
    with start_server(env={**os.environ, "MODELSERVER_ADMIN_TOKEN": TOKEN}) as running:
        yield running


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


def test_set_coefs_without_the_token_is_permission_denied_and_changes_nothing(guarded):
    with guarded.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        stub.SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3]), metadata=bearer(TOKEN))
        predict(stub, 1, 2, 3)
        for metadata in (None, bearer("wrong"), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.SetCoefs(pb2.SetCoefsRequest(coefs=[9, 9, 9]), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        reply = predict(stub, 1, 2, 3)
    assert (reply.y, reply.hit) == (14.0, True)  # predict stays open; coefs and cache untouched


def test_client_sends_the_token_from_the_environment_or_the_flag(guarded):
    workload = str(ROOT / "workloads" / "lru_order.csv")
    command = [sys.executable, str(ROOT / "client.py"), "--host", "127.0.0.1", str(guarded.port), "1,2,3", workload]
    without = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MODELSERVER_ADMIN_TOKEN": ""},
        check=False,
    )
    from_env = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MODELSERVER_ADMIN_TOKEN": TOKEN},
        check=False,
    )
    from_flag = subprocess.run([*command, "--token", TOKEN], capture_output=True, text=True, timeout=60, check=False)
    assert (
        without.returncode == 1 and "SetCoefs refused" in without.stderr and "MODELSERVER_ADMIN_TOKEN" in without.stderr
    )
    assert from_env.stdout.split()[-1] == from_flag.stdout.split()[-1] == "0.3333333333333333"


def test_the_token_never_appears_in_the_log(guarded):
    assert TOKEN not in guarded.log


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
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


def test_tls_serves_clients_that_trust_the_certificate_and_only_them(certificate):
    cert, key = certificate
    with start_server(["--tls-cert", str(cert), "--tls-key", str(key)], tls_ca=cert.read_bytes()) as server:
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "client.py"),
                "--host",
                "localhost",
                "--tls-ca",
                str(cert),
                str(server.port),
                "1,2,3",
                str(ROOT / "workloads" / "lru_order.csv"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        with server.channel() as plaintext, pytest.raises(grpc.RpcError) as refused:
            predict(pb2_grpc.ModelServerStub(plaintext), 1, 2, 3, timeout=3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "0.3333333333333333"
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ", TLS" in server.log


def test_tls_needs_both_certificate_and_key(certificate):
    cert, _ = certificate
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--tls-cert", str(cert)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "TLS needs both --tls-cert and --tls-key" in result.stderr
