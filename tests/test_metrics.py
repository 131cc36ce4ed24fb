"""Prometheus metrics from the real server, scraped over HTTP and parsed with prometheus_client's own parser."""

import functools
import socket
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from serverproc import free_port, start_server
from stubs import pb2, pb2_grpc
from tests.fixtures import ROOT, predict, run_concurrently

TOKEN = "tok-metrics"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def requests(samples, rpc: str, outcome: str) -> float:
    return samples.get(("modelserver_requests_total", (("outcome", outcome), ("rpc", rpc))), 0.0)


def value(samples, name: str) -> float:
    return samples[(name, ())]


@pytest.fixture
def metered():
    metrics_port = free_port()
    with start_server(["--metrics-port", str(metrics_port), "--admin-token", TOKEN]) as server:
        yield server, metrics_port


def test_a_known_sequence_of_calls_is_counted_exactly(metered):
    server, metrics_port = metered
    token = (("authorization", f"Bearer {TOKEN}"),)
    with server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        assert stub.SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3]), metadata=token).error == ""
        for x in range(12):  # 12 misses, 2 of them evictions
            predict(stub, x, 0, 0)
        for x in (11, 10, 11):  # 3 hits
            predict(stub, x, 0, 0)
        assert predict(stub, 1, 2).error  # an error answered
        with pytest.raises(grpc.RpcError):
            stub.SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3]))  # refused: no token
        assert stub.ReloadModel(pb2.ReloadModelRequest(), metadata=token).error  # no model file: an error
        stats = stub.GetStats(pb2.GetStatsRequest())
        samples = scrape(metrics_port)
    assert (stats.hits, stats.misses, stats.evictions, stats.size) == (3, 12, 2, 10)
    assert value(samples, "modelserver_cache_hits_total") == 3
    assert value(samples, "modelserver_cache_misses_total") == 12
    assert value(samples, "modelserver_cache_evictions_total") == 2
    assert value(samples, "modelserver_cache_entries") == 10
    assert value(samples, "modelserver_cache_capacity") == 10
    assert value(samples, "modelserver_cache_batched_rows_total") == 0
    assert value(samples, "modelserver_model_generation") == 1
    assert value(samples, "modelserver_requests_in_flight") == 0
    assert requests(samples, "SetCoefs", "ok") == 1
    assert requests(samples, "SetCoefs", "PERMISSION_DENIED") == 1
    assert requests(samples, "Predict", "ok") == 15
    assert requests(samples, "Predict", "error") == 1
    assert requests(samples, "ReloadModel", "error") == 1
    assert requests(samples, "GetStats", "ok") == 1
    assert samples[("modelserver_request_duration_seconds_count", (("rpc", "Predict"),))] == 16
    assert samples[("modelserver_request_duration_seconds_bucket", (("le", "10.0"), ("rpc", "Predict")))] == 16
    assert samples[("modelserver_model_info", (("kind", "linear"), ("name", "linear")))] == 1
    assert value(samples, "process_resident_memory_bytes") > 0
    assert not any(name.startswith("grpc") or "Health" in str(labels) for name, labels in samples)


class Scaled(nn.Module):
    input_width: int

    def __init__(self, factor: float):
        super().__init__()
        self.input_width = 3
        self.factor = factor

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.factor * X.sum(dim=1)


def test_reloads_and_failed_reloads_and_the_model_served(tmp_path):
    path = tmp_path / "scaled.pt"
    torch.jit.script(Scaled(1.0)).save(str(path))
    metrics_port = free_port()
    with start_server(["--model", str(path), "--metrics-port", str(metrics_port)]) as server, server.channel() as ch:
        stub = pb2_grpc.ModelServerStub(ch)
        before = scrape(metrics_port)
        assert stub.ReloadModel(pb2.ReloadModelRequest()).error == ""
        path.write_bytes(b"not a model")
        assert stub.ReloadModel(pb2.ReloadModelRequest()).error
        samples = scrape(metrics_port)
    assert value(samples, "modelserver_model_reloads_total") == 1
    assert value(samples, "modelserver_model_reload_failures_total") == 1
    assert value(samples, "modelserver_model_generation") == value(before, "modelserver_model_generation") + 1 == 2
    assert value(samples, "modelserver_model_last_change_timestamp_seconds") > value(
        before, "modelserver_model_last_change_timestamp_seconds"
    )
    assert samples[("modelserver_model_info", (("kind", "TorchScript"), ("name", "scaled")))] == 1


def test_counters_stay_exact_under_16_concurrent_clients(metered):
    server, metrics_port = metered
    with server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        stub.SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3]), metadata=(("authorization", f"Bearer {TOKEN}"),))
        before = scrape(metrics_port)
        seen = {"hits": 0, "misses": 0, "errors": 0}
        lock = threading.Lock()

        def client(worker: int) -> None:
            mine = {"hits": 0, "misses": 0, "errors": 0}
            for i in range(150):
                reply = predict(stub, *((worker, i % 7, 0) if i % 10 else (1, 2)))
                mine["errors" if reply.error else "hits" if reply.hit else "misses"] += 1
            with lock:
                for key, count in mine.items():
                    seen[key] += count

        run_concurrently(functools.partial(client, worker) for worker in range(16))
        after = scrape(metrics_port)
        stats = stub.GetStats(pb2.GetStatsRequest())

    def grown(name: str) -> float:
        return value(after, name) - value(before, name)

    assert grown("modelserver_cache_hits_total") == seen["hits"] == stats.hits
    assert grown("modelserver_cache_misses_total") == seen["misses"] == stats.misses
    assert requests(after, "Predict", "ok") == seen["hits"] + seen["misses"] == 16 * 150 - seen["errors"]
    assert requests(after, "Predict", "error") == seen["errors"] == 16 * 15


def start_refused(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_taken_metrics_port_is_one_line_exit_1_and_leaves_the_grpc_port_free():
    grpc_port = free_port()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        taken_port = taken.getsockname()[1]
        result = start_refused("--port", str(grpc_port), "--metrics-port", str(taken_port))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.endswith(f"cannot serve metrics on port {taken_port}: address already in use")
    with socket.create_server(("127.0.0.1", grpc_port)):
        pass  # binds: the server did not leave it half-bound


@pytest.mark.parametrize("port", ["0", "65536", "-1"])
def test_a_metrics_port_out_of_range_is_one_line_and_exit_1(port):
    result = start_refused("--port", "0", "--metrics-port", port)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--metrics-port must be from 1 to 65535, got {port}" in result.stderr


def test_without_the_flag_no_metrics_are_served_or_loaded(server):
    assert "metrics on" not in server.log
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, server; server.start_server(server.ServerConfig(port=0)); "
         "print('prometheus_client' in sys.modules)"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert probe.stdout.strip() == "False", probe.stderr


def test_the_model_is_named_as_the_inference_protocol_names_it():
    metrics_port = free_port()
    with start_server(["--metrics-port", str(metrics_port), "--model-name", "prices"]):
        samples = scrape(metrics_port)
    assert samples[("modelserver_model_info", (("kind", "linear"), ("name", "prices")))] == 1
