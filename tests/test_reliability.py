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
from pathlib import Path

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


def start_slow_server(folder: Path, *args: str):
    """A server of the Slow model, which takes about a second a call."""
    model = folder / "slow.pt"
    torch.jit.script(Slow()).save(str(model))
    return start_server(["--model", str(model), *args])


def calls_in_flight(stub, count: int) -> list[grpc.Future]:
    """`count` Predict calls of Slow's, returned once every one of them is being computed."""
    in_flight = [stub.Predict.future(pb2.PredictRequest(X=[i, 2, 3]), timeout=60) for i in range(count)]
    deadline = time.monotonic() + 20
    while stub.GetStats(pb2.GetStatsRequest()).misses < count and time.monotonic() < deadline:
        time.sleep(0.01)  # a miss is counted as its computation starts
    return in_flight


def test_sigterm_under_load_finishes_in_flight_calls_refuses_new_ones_and_exits_0(tmp_path):
    server = start_slow_server(tmp_path, "--grace", "8")
    with server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        in_flight = calls_in_flight(stub, 4)
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


def test_signal_bursts_in_any_order_finish_in_flight_calls_and_exit_0(tmp_path):
    """Two SIGTERMs 0.2 s apart with 8 calls in flight, then SIGINT: every call answered, exit 0, no traceback."""
    server = start_slow_server(tmp_path, "--grace", "20", "--workers", "8")
    with server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        in_flight = calls_in_flight(stub, 8)
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            server.process.send_signal(sig)
            time.sleep(0.2)  # the burst's own spacing, as the issue reported it
        answers = [call.result().y for call in in_flight]
    assert answers == [5.0 + i for i in range(8)]
    assert server.process.wait(timeout=30) == 0
    assert server.log.count("received: stopping") == 1 and "stopped" in server.log and "Traceback" not in server.log


def test_reload_signals_5_ms_apart_never_kill_the_server(tmp_path):
    with start_slow_server(tmp_path) as server, server.channel() as channel:
        for _ in range(3):
            server.process.send_signal(signal.SIGHUP)
            time.sleep(0.005)
        deadline = time.monotonic() + 30
        while server.log.count("reloaded") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the log line is the only sign a signal was handled
        reply = predict(pb2_grpc.ModelServerStub(channel), 1, 2, 3, timeout=30)
        assert server.process.poll() is None
    assert reply.error == "" and server.log.count("reloaded") >= 2
    assert server.process.returncode == 0


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_requests_the_model_refuses_leave_no_memory_behind():
    """Thirty different 1,000,000-value rows the model refuses: nothing of them is kept (it was 77 MB each)."""
    with start_server() as server, server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        refused_before_any_model = predict(stub, *([0.5] * 1_000_000), timeout=30)
        stub.SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3]))
        baseline = rss_mb(server.process.pid)
        for i in range(30):
            reply = predict(stub, *([i + 0.5] * 1_000_000), timeout=30)
            assert reply.error == "X has 1000000 values per row but the model takes 3"
        grown = rss_mb(server.process.pid) - baseline
    assert refused_before_any_model.error == "no model yet: call SetCoefs first"
    assert grown < 150, f"resident memory grew by {grown:.0f} MB"


def start_refused(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e10"])
def test_impossible_message_limits_are_refused_at_start_in_one_line(value):
    result = start_refused("--max-message-mb", value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"--max-message-mb: must be a size in MiB above 0 and at most 2047, got {value}" in result.stderr


@pytest.mark.parametrize(
    "args, env_token, message",
    [
        (("--admin-token", ""), None, "--admin-token: is empty"),
        ((), "", "$MODELSERVER_ADMIN_TOKEN is empty"),
        (("--admin-token", "tökén"), None, "--admin-token: must be printable ASCII"),
        (("--admin-token", "two\nlines"), None, "--admin-token: must be printable ASCII"),
        ((), "with space", "$MODELSERVER_ADMIN_TOKEN must be printable ASCII"),
    ],
    ids=["empty-flag", "empty-variable", "non-ascii", "newline", "space"],
)
def test_admin_tokens_that_cannot_work_are_refused_at_start_in_one_line(args, env_token, message):
    env = {key: value for key, value in os.environ.items() if key != "MODELSERVER_ADMIN_TOKEN"}
    if env_token is not None:
        env["MODELSERVER_ADMIN_TOKEN"] = env_token
    result = start_refused(*args, env=env)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_the_ready_line_says_whether_set_coefs_needs_the_token(guarded, server):
    assert "SetCoefs and ReloadModel need the admin token" in guarded.log
    assert "no admin token" in server.log


def test_a_malformed_request_is_one_log_line_and_the_server_carries_on(server, stub, coefs_123):
    with server.channel() as channel:
        raw_predict = channel.unary_unary("/ModelServer/Predict", request_serializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            raw_predict(b"\xff\xff\xff", timeout=CALL_DEADLINE)
    assert refused.value.code() == grpc.StatusCode.INTERNAL
    assert predict(stub, 1, 2, 3).y == 14.0
    about_it = [line for line in server.log_lines if "deserializing" in line]
    assert about_it[-1].endswith("Exception deserializing message!: Error parsing message with type 'PredictRequest'\n")
    assert "Traceback" not in server.log


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


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_matched_case_insensitively(guarded, scheme):
    with guarded.channel() as channel:
        reply = pb2_grpc.ModelServerStub(channel).SetCoefs(
            pb2.SetCoefsRequest(coefs=[1, 2, 3]), metadata=(("authorization", f"{scheme} {TOKEN}"),)
        )
    assert reply.error == ""


def test_the_token_never_appears_in_the_log(guarded):
    assert TOKEN not in guarded.log


# --- TLS ----------------------------------------------------------------------------------------


def client_with(port: int, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "client.py"), "--host", "localhost", *options, str(port), "1,2,3"]
    return subprocess.run(
        [*command, str(ROOT / "workloads" / "lru_order.csv")], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def tls_server(certificate):
    cert, key = certificate
    with start_server(["--tls-cert", str(cert), "--tls-key", str(key)], tls_ca=cert.read_bytes()) as server:
        yield server


def test_tls_serves_clients_that_trust_the_certificate_and_only_them(tls_server, certificate):
    cert, _ = certificate
    result = client_with(tls_server.port, "--tls-ca", str(cert))
    with tls_server.channel() as plaintext, pytest.raises(grpc.RpcError) as refused:
        predict(pb2_grpc.ModelServerStub(plaintext), 1, 2, 3, timeout=3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "0.3333333333333333"
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ", TLS" in tls_server.log


def test_a_client_that_trusts_another_ca_is_told_the_certificate_was_refused_at_once(tls_server, tmp_path):
    other = tmp_path / "other-ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other",
         "-keyout", str(tmp_path / "other-key.pem"), "-out", str(other)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    started = time.monotonic()
    result = client_with(tls_server.port, "--tls-ca", str(other))
    assert time.monotonic() - started < 10
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: the TLS handshake with localhost:{tls_server.port} failed: "
        "the server's certificate is refused (self-signed certificate)"
    ]


def test_a_plaintext_client_before_a_tls_server_is_told_so_at_once(tls_server):
    started = time.monotonic()
    result = client_with(tls_server.port)
    assert time.monotonic() - started < 10
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: the server at localhost:{tls_server.port} speaks TLS: pass --tls-ca with the CA that signed its "
        "certificate"
    ]


def test_a_tls_client_before_a_plaintext_server_is_told_so_at_once(server, certificate):
    cert, _ = certificate
    started = time.monotonic()
    result = client_with(server.port, "--tls-ca", str(cert))
    assert time.monotonic() - started < 10
    assert result.returncode == 1 and "does not speak TLS" in result.stderr and "leave out --tls-ca" in result.stderr


def test_a_ca_file_that_is_not_pem_is_a_usage_error(server, tmp_path):
    bogus = tmp_path / "ca.txt"
    bogus.write_text("not a certificate\n")
    result = client_with(server.port, "--tls-ca", str(bogus))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: --tls-ca {bogus} is not a PEM certificate (no '-----BEGIN CERTIFICATE-----' line)"
    )


@pytest.mark.parametrize(
    "swap, message",
    [
        ("cert", "--tls-cert {path} is not a PEM certificate"),
        ("key", "--tls-key {path} is not a PEM private key"),
        ("other-key", "--tls-key {path} does not match the certificate in --tls-cert"),
    ],
)
def test_unusable_certificate_files_are_named_with_their_problem(certificate, tmp_path, swap, message):
    cert, key = certificate
    if swap == "other-key":
        path = tmp_path / "other.pem"
        subprocess.run(["openssl", "genrsa", "-out", str(path), "2048"], check=True, capture_output=True, timeout=60)
        args = ("--tls-cert", str(cert), "--tls-key", str(path))
    else:
        path = tmp_path / "not-pem.txt"
        path.write_text("hello\n")
        args = (
            ("--tls-cert", str(path), "--tls-key", str(key))
            if swap == "cert"
            else ("--tls-cert", str(cert), "--tls-key", str(path))
        )
    result = start_refused(*args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message.format(path=path) in result.stderr


def test_tls_needs_both_certificate_and_key(certificate):
    cert, _ = certificate
    result = start_refused("--tls-cert", str(cert))
    assert result.returncode == 2 and "TLS needs both --tls-cert and --tls-key" in result.stderr
