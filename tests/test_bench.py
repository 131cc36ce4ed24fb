"""bench.py as a user runs it: short, real runs against real servers. Only the report's shape and its
counts are asserted; timings belong in BENCHMARKS.md, not in tests."""

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures import ROOT

BENCH = [sys.executable, str(ROOT / "bench.py")]


def run_bench(*options, timeout=120, env=None):
    return subprocess.run(
        [*BENCH, *options], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, check=False
    )


def test_floor_run_reports_both_targets_and_paired_ratios():
    result = run_bench(
        "--floor",
        "--mode",
        "hit",
        "--mode",
        "miss",
        "--concurrency",
        "2",
        "--rounds",
        "2",
        "--duration",
        "0.3",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {(row["mode"], row["target"]): row for row in report["results"]}
    assert set(rows) == {("hit", "floor"), ("hit", "server"), ("miss", "floor"), ("miss", "server")}
    assert rows["hit", "server"]["hit_rate"] == 1.0  # one X forever: all but the first call hit
    assert rows["miss", "server"]["hit_rate"] == 0.0  # a new X every call, never one seen before
    assert all(row["requests"] > 0 and row["cpu_us_per_request"] > 0 for row in rows.values())
    assert [(ratio["mode"], ratio["concurrency"]) for ratio in report["ratios"]] == [("hit", 2), ("miss", 2)]
    assert all(ratio["rps"] > 0 for ratio in report["ratios"])


def test_batch_run_counts_rows_and_draws_the_chart(tmp_path):
    chart = tmp_path / "rows.png"
    result = run_bench(
        "--batch", "8", "--mode", "hit", "--concurrency", "2", "--rounds", "2", "--duration", "0.3",
        "--chart", str(chart), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {row["target"]: row for row in report["results"]}
    assert rows["batch"]["rows_per_second"] == pytest.approx(rows["batch"]["rps"] * 8)
    assert rows["batch"]["hit_rate"] == rows["server"]["hit_rate"] == 1.0  # the one X, from the cache
    assert [ratio["mode"] for ratio in report["batch_ratios"]] == ["hit"]
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_tables_go_to_stdout_and_name_every_figure():
    result = run_bench("--mode", "mix", "--concurrency", "1", "--rounds", "1", "--duration", "0.3")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()[1:3]
    assert header.split()[:4] == ["mode", "target", "clients", "rps"]
    assert row.split()[:3] == ["mix", "server", "1"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--floor", "--port", "5440"], "leave out --port"),
        (["--instructions", "--port", "5440"], "leave out --port"),
        (["--tls-ca", "ca.pem"], "--tls-ca is for a running TLS server"),
        (["--concurrency", "4,x"], "expected numbers like 1,4,16"),
    ],
)
def test_contradictory_options_are_refused_in_one_line(options, message):
    result = run_bench(*options, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_instructions_without_valgrind_is_refused_before_any_load():
    result = run_bench("--instructions", timeout=30, env={**os.environ, "PATH": "/nonexistent"})
    assert result.returncode == 2
    assert "--instructions needs valgrind" in result.stderr
    assert result.stdout == ""
