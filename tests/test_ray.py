"""The Ray Serve fleet for real: a local Ray on loopback, 2 replicas behind Ray's gRPC proxy, started by
deploy/ray/fleet.py as `make serve-ray` starts it, called over gRPC as users call it."""

import csv
import functools
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_server import oip, oip_grpc
from stubs import pb2
from tests.fixtures import ROOT, run_concurrently
from tests.ray_fleet import (
    CACHE_SIZE,
    CALL_TIMEOUT,
    REPLICAS,
    Fleet,
    predict,
    predict_during_changes,
    running_fleet,
    set_coefs,
)

CLIENT = [sys.executable, str(ROOT / "client.py")]
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|\[::ffff:127\.\d+\.\d+\.\d+\]):\d+$")


@pytest.fixture(scope="module")
def fleet():
    with running_fleet() as started:
        yield started


def replicas_of(fleet: Fleet, rows) -> dict[tuple, str]:
    """Which replica each row reaches, by its affinity key."""
    return {tuple(row): predict(fleet, row)[1] for row in rows}


def fleet_stats(fleet: Fleet) -> dict[str, pb2.GetStatsResponse]:
    """Every replica's GetStats, reached by trying sessions until each has answered (bounded)."""
    stats: dict[str, pb2.GetStatsResponse] = {}
    for session in range(200):
        reply = fleet.stub.GetStats(
            pb2.GetStatsRequest(), metadata=(("session_id", f"stats-{session}"),), timeout=CALL_TIMEOUT
        )
        stats[reply.replica] = reply
        if len(stats) == REPLICAS:
            return stats
    raise AssertionError(f"only {sorted(stats)} of {REPLICAS} replicas answered GetStats")


def test_both_replicas_take_traffic_and_each_x_keeps_its_replica(fleet):
    set_coefs(fleet, [1, 2, 3])
    rows = [[1.0, 2.0, float(i)] for i in range(40)]
    first = replicas_of(fleet, rows)
    assert len(set(first.values())) == REPLICAS
    assert replicas_of(fleet, rows) == first
    # Rows with one cache key (equal once rounded) reach one replica too.
    nearby = replicas_of(fleet, [[1.00001, 2.0, float(i)] for i in range(40)])
    assert list(nearby.values()) == list(first.values())
    stats = fleet_stats(fleet)
    assert all(reply.capacity == CACHE_SIZE for reply in stats.values())


def test_the_same_api_through_the_proxy(fleet):
    set_coefs(fleet, [1, 2, 3])
    assert predict(fleet, [1, 2, 3])[0].y == 14
    assert "empty" in fleet.stub.SetCoefs(pb2.SetCoefsRequest(coefs=[]), timeout=CALL_TIMEOUT).error
    assert predict(fleet, [1, 2])[0].error == "X has 2 values per row but the model takes 3"
    health = health_pb2_grpc.HealthStub(fleet.channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    inference = oip_grpc.GRPCInferenceServiceStub(fleet.channel)
    rows = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.float32)
    request = oip.ModelInferRequest(model_name="linear", id="fleet")
    request.inputs.add(name="X", datatype="FP32", shape=[2, 3])
    request.raw_input_contents.append(rows.numpy().tobytes())
    reply = inference.ModelInfer(request, timeout=CALL_TIMEOUT)
    assert reply.id == "fleet"
    assert torch.frombuffer(bytearray(reply.raw_output_contents[0]), dtype=torch.float32).tolist() == [14, 32]
    with pytest.raises(grpc.RpcError) as refused:
        inference.ModelMetadata(oip.ModelMetadataRequest(name="nope"), timeout=CALL_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_no_answer_from_replaced_coefficients_while_setcoefs_keeps_changing_them(fleet):
    """Coefficients [k, 0, 0] answer k for X = [1, a, b]: every answer tells which SetCoefs it came from."""
    set_coefs(fleet, [1, 0, 0])
    churn = predict_during_changes(
        fleet,
        lambda k: set_coefs(fleet, [k, 0, 0]),
        range(2, 10),
        in_force=1,
        callers=16,
        draw_row=lambda rows: [1, rows.randrange(5), rows.randrange(5)],  # many hits, which SetCoefs must empty
        least_answer=lambda X, k: k,
    )
    assert churn.in_force == 9
    assert churn.errors == []
    assert churn.stale == []
    assert len(churn.answers) > 3  # the answers followed the changes
    assert all(reply.y == 9 for reply in (predict(fleet, [1, a, 0])[0] for a in range(20)))


def test_of_two_racing_setcoefs_one_is_in_force_everywhere(fleet):
    rows = [[1.0, float(i), 0.0] for i in range(40)]
    for a, b in ((11, 12), (13, 14), (15, 16)):
        run_concurrently([functools.partial(set_coefs, fleet, [k, 0, 0]) for k in (a, b)], 120)
        answers = [predict(fleet, row) for row in rows]
        assert len({replica for _, replica in answers}) == REPLICAS
        assert len({reply.y for reply, _ in answers}) == 1
        assert answers[0][0].y in (a, b)


def test_a_replica_killed_after_setcoefs_comes_back_with_the_new_coefficients(fleet):
    rows = [[1.0, float(i), 0.0] for i in range(40)]
    before = set(replicas_of(fleet, rows).values())
    set_coefs(fleet, [7, 0, 0])
    victim = replica_pids()[0]
    os.kill(victim, signal.SIGKILL)

    deadline = time.monotonic() + 120
    seen: dict[str, set[float]] = {}
    while time.monotonic() < deadline:
        for row in rows:
            try:
                reply, replica = predict(fleet, row)
            except grpc.RpcError:
                continue  # the router may still pick the dead replica until the controller notices
            seen.setdefault(replica, set()).add(reply.y)
        if len(set(seen) - before) == 1 and len(replica_pids()) == REPLICAS:
            break
    newcomers = set(seen) - before
    assert len(newcomers) == 1, f"no replacement replica answered within 120 s: {sorted(seen)}"
    assert all(answers == {7.0} for answers in seen.values()), seen


def replica_pids() -> list[int]:
    """The processes of the server replicas (Ray names each after its deployment)."""
    pattern = "ServeReplica:modelserver:ModelServerReplica"
    listed = subprocess.run(["pgrep", "-f", pattern], capture_output=True, check=False)
    return sorted(int(pid) for pid in listed.stdout.split())


def test_affinity_holds_the_fleet_cache_once_not_twice(fleet):
    """16 rows: more than one replica's cache of 10, under the fleet's 20 when each row has one replica."""
    set_coefs(fleet, [1, 2, 3])
    candidates = replicas_of(fleet, [[2.0, 3.0, float(i)] for i in range(200)])
    by_replica: dict[str, list[tuple]] = {}
    for row, replica in candidates.items():
        by_replica.setdefault(replica, []).append(row)
    per_replica = 16 // REPLICAS
    rows = [row for replica_rows in by_replica.values() for row in replica_rows[:per_replica]]
    assert len(rows) == 16

    def hit_rate(affinity: bool) -> tuple[float, dict[tuple, set[str]]]:
        set_coefs(fleet, [1, 2, 3])  # every cache empty
        where: dict[tuple, set[str]] = {}
        hits = 0
        for row in itertools.islice(itertools.cycle(rows), 10 * len(rows)):
            reply, replica = predict(fleet, list(row), affinity=affinity)
            hits += reply.hit
            where.setdefault(row, set()).add(replica)
        return hits / (10 * len(rows)), where

    with_affinity, where = hit_rate(affinity=True)
    without_affinity, _ = hit_rate(affinity=False)
    assert all(len(replicas) == 1 for replicas in where.values())  # so no row is cached on two replicas
    assert with_affinity == 0.9  # only each row's first call misses
    assert without_affinity < with_affinity - 0.25


def test_client_through_the_proxy_counts_every_row(fleet):
    workloads = sorted((ROOT / "workloads").glob("*.csv"))
    rows = sum(sum(1 for cells in csv.reader(path.open()) if any(map(is_number, cells))) for path in workloads)
    before = sum(reply.hits + reply.misses for reply in fleet_stats(fleet).values())
    options = ["--host=127.0.0.1", "--application=modelserver", "--affinity"]
    finished = subprocess.run(
        [*CLIENT, *options, str(fleet.grpc_port), "1,2,3", *map(str, workloads)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    hit_rate = float(finished.stdout.splitlines()[-1])
    after = fleet_stats(fleet)
    assert sum(reply.hits + reply.misses for reply in after.values()) - before == rows
    assert 0 < hit_rate < 1


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def test_every_ray_connection_stays_on_loopback(fleet):
    connections = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True)
    processes = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    ray_pids = {pid for pid in processes if is_ray_process(pid)}
    assert ray_pids, "no Ray process found"
    checked = 0
    for line in connections.stdout.splitlines():
        pids = {int(pid) for pid in re.findall(r"pid=(\d+)", line)}
        if pids & ray_pids:
            local, peer = line.split()[2:4]
            assert LOOPBACK.match(local) and LOOPBACK.match(peer), line
            checked += 1
    assert checked > 10  # Ray's processes talk to each other a lot: these are them


def is_ray_process(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return pid != os.getpid() and (b"ray" in command or b"gcs_server" in command)
