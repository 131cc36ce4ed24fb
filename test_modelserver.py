"""The real server.py over real gRPC: every RPC, the cache seen through it, errors, health, shutdown."""

import functools
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from serverproc import start_server
from stubs import pb2, pb2_grpc
from tests.fixtures import ROOT, predict, run_concurrently


def stats(stub):
    return stub.GetStats(pb2.GetStatsRequest())


def test_health_reports_serving_for_the_server_and_the_model_service(server):
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ModelServer"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(server):
    with server.channel() as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"ModelServer", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_ready_line_names_address_workers_and_cache_size(server):
    assert f"ready: serving on 127.0.0.1:{server.port} (4 workers, cache size 10" in server.log


def test_set_coefs_answers_an_empty_error(stub):
    assert stub.SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3])).error == ""


def test_predict_computes_and_caches(stub, coefs_123):
    first = predict(stub, 1, 2, 3)
    assert (first.y, first.hit, first.error) == (14.0, False, "")
    second = predict(stub, 1, 2, 3)
    assert (second.y, second.hit) == (14.0, True)


def test_predict_fractional_input_matches_x_dot_coefs(stub, coefs_123):
    reply = predict(stub, 0.5, 0.25, 0.125)
    assert reply.y == pytest.approx(0.5 + 0.5 + 0.375, abs=1e-4)


def test_inputs_equal_after_rounding_hit_the_same_entry(stub, coefs_123):
    predict(stub, 1, 2, 3)
    reply = predict(stub, 1.00004, 2.00001, 2.99996)
    assert reply.hit and reply.y == 14.0


def test_first_input_is_evicted_after_10_other_inputs(stub, coefs_123):
    predict(stub, 1, 2, 3)
    for i in range(10):
        assert not predict(stub, 100 + i, 0, 0).hit
    assert not predict(stub, 1, 2, 3).hit


def test_an_input_used_again_survives_10_others(stub, coefs_123):
    predict(stub, 1, 2, 3)
    for i in range(9):
        predict(stub, 100 + i, 0, 0)
    assert predict(stub, 1, 2, 3).hit
    predict(stub, 200, 0, 0)
    assert predict(stub, 1, 2, 3).hit


def test_set_coefs_invalidates_the_cache(stub, coefs_123):
    predict(stub, 1, 2, 3)
    stub.SetCoefs(pb2.SetCoefsRequest(coefs=[0, 0, 1]))
    reply = predict(stub, 1, 2, 3)
    assert (reply.y, reply.hit) == (3.0, False)


def test_get_stats_counts_what_the_cache_did(stub, coefs_123):
    before = stats(stub)
    assert before.size == 0 and before.capacity == 10
    for i in range(12):
        predict(stub, i, 0, 0)
    predict(stub, 11, 0, 0)
    after = stats(stub)
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 12)
    assert (after.evictions - before.evictions, after.size) == (2, 10)


@pytest.mark.parametrize(
    "x, message",
    [
        ((1, 2), "2 values per row but the model takes 3"),
        ((1, 2, 3, 4), "4 values per row but the model takes 3"),
        ((), "X is empty"),
    ],
)
def test_bad_x_gets_an_error_and_the_server_stays_correct(stub, coefs_123, x, message):
    reply = predict(stub, *x)
    assert message in reply.error and not reply.hit
    assert predict(stub, 1, 2, 3).y == 14.0


@pytest.mark.parametrize(
    "coefs, message",
    [
        ([], "coefs is empty"),
        ([1, float("nan"), 3], "finite: 1 of 3"),
        ([float("inf"), 1, float("-inf")], "finite: 2 of 3"),
    ],
)
def test_bad_coefs_get_an_error_and_change_nothing(stub, coefs_123, coefs, message):
    predict(stub, 1, 2, 3)
    assert message in stub.SetCoefs(pb2.SetCoefsRequest(coefs=coefs)).error
    reply = predict(stub, 1, 2, 3)
    assert (reply.y, reply.hit) == (14.0, True)


def test_nan_input_is_answered_and_never_cached(stub, coefs_123):
    for _ in range(2):
        reply = predict(stub, float("nan"), 0, 0)
        assert reply.error == "" and reply.y != reply.y and not reply.hit
    assert stats(stub).size == 0


def test_predict_before_any_set_coefs_gets_an_error():
    with start_server() as fresh, fresh.channel() as channel:
        reply = predict(pb2_grpc.ModelServerStub(channel), 1, 2, 3)
    assert "call SetCoefs first" in reply.error


def test_flags_set_workers_and_cache_size():
    with start_server(["--workers", "2", "--cache-size", "3"]) as small, small.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        stub.SetCoefs(pb2.SetCoefsRequest(coefs=[1]))
        for i in range(4):
            predict(stub, i)
        assert stats(stub).capacity == 3 and not predict(stub, 0).hit
    assert "(2 workers, cache size 3" in small.log


def test_reload_without_a_model_file_says_so(stub):
    assert "no model file" in stub.ReloadModel(pb2.ReloadModelRequest()).error


def test_sigterm_goes_not_serving_finishes_and_exits_0_within_5_seconds():
    server = start_server()
    with server.channel() as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        server.process.wait(timeout=10)
    assert time.monotonic() - started < 5
    assert server.process.returncode == 0
    assert "SIGTERM received" in server.log and "Traceback" not in server.log


def test_sigint_also_stops_cleanly():
    server = start_server()
    assert server.stop(signal.SIGINT) == 0


def test_a_taken_port_is_one_clear_line_and_exit_1(server):
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", str(server.port)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}: address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_flag_values_are_refused_by_the_parser():
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "must be at least 1" in result.stderr


@pytest.mark.parametrize("script", ["server.py", "client.py"])
def test_missing_stubs_are_named_with_the_command_that_makes_them(tmp_path, script):
    for name in ("server.py", "models.py", "client.py", "stubs.py"):
        shutil.copy(ROOT / name, tmp_path)
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: the generated gRPC stubs are missing; run `make stubs` "
        "(or `python3 -m grpc_tools.protoc -I=. --python_out=. --grpc_python_out=. modelserver.proto inference.proto`)"
    ]


def test_concurrent_clients_all_get_right_answers(stub, coefs_123):
    wrong: list[str] = []

    def client(offset):
        for i in range(50):
            reply = predict(stub, offset, i, 0)
            if reply.error or reply.y != offset + 2 * i:
                wrong.append(f"{offset},{i}: {reply}")

    run_concurrently((functools.partial(client, n) for n in range(8)), timeout=30)
    assert wrong == []


def test_unimplemented_methods_do_not_exist(server):
    with server.channel() as channel:
        call = channel.unary_unary("/ModelServer/Nope")
        with pytest.raises(grpc.RpcError) as error:
            call(b"", timeout=5)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
