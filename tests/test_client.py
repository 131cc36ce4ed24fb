"""client.py as a user runs it, against a real server.py process."""

import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from serverproc import free_port, start_server
from stubs import pb2, pb2_grpc
from tests.fixtures import ROOT

WORKLOADS = ROOT / "workloads"
CLIENT = [sys.executable, str(ROOT / "client.py")]


def client_command(port, coefs, *csvs, options=()):
    return [*CLIENT, "--host", "127.0.0.1", *options, str(port), coefs, *map(str, csvs)]


def run_client(port, coefs, *csvs, options=(), timeout=60):
    return subprocess.run(
        client_command(port, coefs, *csvs, options=options),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def csv_rows(path):
    """The numeric rows of a workload, as the client sends them."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append([float(cell) for cell in line.split(",")])
        except ValueError:
            continue
    return rows


def reference_hit_rate(rows, capacity=10, lru=True):
    """An independent cache: keys rounded by torch itself, LRU (or FIFO) of `capacity`."""
    entries: OrderedDict[tuple[float, ...], bool] = OrderedDict()
    hits = 0
    for row in rows:
        key = tuple(torch.round(torch.tensor(row, dtype=torch.float32), decimals=4).tolist())
        if key in entries:
            hits += 1
            if lru:
                entries.move_to_end(key)
            continue
        entries[key] = True
        if len(entries) > capacity:
            entries.popitem(last=False)
    return hits / len(rows)


def stats(server):
    with server.channel() as channel:
        return pb2_grpc.ModelServerStub(channel).GetStats(pb2.GetStatsRequest(), timeout=5)


@pytest.mark.parametrize("workload", ["no_repeats.csv", "lru_order.csv", "threads_a.csv"])
def test_last_line_is_the_exact_hit_rate_of_a_single_file(server, workload):
    result = run_client(server.port, "1,2,3", WORKLOADS / workload)
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == repr(reference_hit_rate(csv_rows(WORKLOADS / workload)))


def test_the_lru_workload_tells_lru_from_fifo(server):
    rows = csv_rows(WORKLOADS / "lru_order.csv")
    assert reference_hit_rate(rows, lru=True) != reference_hit_rate(rows, lru=False)
    result = run_client(server.port, "1,2,3", WORKLOADS / "lru_order.csv")
    assert last_line(result.stdout) == repr(reference_hit_rate(rows, lru=True)) == "0.3333333333333333"


def test_no_repeats_prints_zero(server):
    assert last_line(run_client(server.port, "1,2,3", WORKLOADS / "no_repeats.csv").stdout) == "0.0"


def test_several_files_at_once_count_every_row(server):
    files = sorted(WORKLOADS.glob("threads_*.csv"))
    before = stats(server)
    result = run_client(server.port, "1,2,3", *files)
    after = stats(server)
    assert result.returncode == 0, result.stderr
    total = sum(len(csv_rows(path)) for path in files)
    counted_hits = after.hits - before.hits
    assert (after.hits + after.misses) - (before.hits + before.misses) == total
    assert float(last_line(result.stdout)) == counted_hits / total
    for path in files:
        assert f"{path}: {len(csv_rows(path))} rows" in result.stderr


def test_a_missing_file_is_one_line_and_exit_2_before_any_call(server):
    before = stats(server)
    result = run_client(server.port, "1,2,3", WORKLOADS / "no_repeats.csv", "missing.csv")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: cannot read missing.csv: No such file or directory"
    assert result.stdout == ""
    assert stats(server).misses == before.misses


def test_bad_coefs_argument_is_exit_2():
    result = run_client(free_port(), "1,two,3", WORKLOADS / "no_repeats.csv")
    assert result.returncode == 2 and "COEFS must be comma-separated numbers" in result.stderr


def test_a_set_coefs_error_ends_the_run_with_exit_1(server):
    result = run_client(server.port, "1,nan,3", WORKLOADS / "no_repeats.csv")
    assert result.returncode == 1
    assert "error: SetCoefs: coefs must be finite" in result.stderr and result.stdout == ""


def test_malformed_rows_are_reported_skipped_and_make_exit_1(server, tmp_path):
    workload = tmp_path / "mixed.csv"
    workload.write_text("a,b,c\n1,2,3\n\n1,oops,3\n1,2,3\n1,2\n")
    result = run_client(server.port, "1,2,3", workload)
    assert result.returncode == 1
    assert f"{workload}:1: header skipped" in result.stderr
    assert f"{workload}:4: skipped, not a number: 'oops'" in result.stderr
    assert f"{workload}:6: X has 2 values per row but the model takes 3" in result.stderr
    assert last_line(result.stdout) == "0.5" and "Traceback" not in result.stderr


def test_a_server_started_after_the_client_is_waited_for(tmp_path):
    port = free_port()
    client = subprocess.Popen(
        client_command(port, "1,2,3", WORKLOADS / "lru_order.csv"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with start_server(port=port):
        stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0, stderr
    assert last_line(stdout) == "0.3333333333333333"


def test_no_server_at_all_is_one_line_and_exit_1_in_bounded_time():
    started = time.monotonic()
    result = run_client(free_port(), "1,2,3", WORKLOADS / "no_repeats.csv", options=("--timeout", "3"))
    assert time.monotonic() - started < 15
    assert result.returncode == 1 and result.stdout == ""
    assert last_line(result.stderr).startswith("error: could not reach the server at 127.0.0.1:")


def long_workload(tmp_path, rows=20000):
    path = tmp_path / "long.csv"
    path.write_text("".join(f"{i % 997},{i % 13},{i % 7}\n" for i in range(rows)))
    return path


def wait_for_progress(server, calls, timeout=30):
    """Block until the server has answered `calls` predictions (a readiness check, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = stats(server)
        if current.hits + current.misses >= calls:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the client made fewer than {calls} calls in {timeout} s")


def test_a_server_killed_mid_run_ends_the_client_with_what_it_counted(tmp_path):
    workload = long_workload(tmp_path)
    server = start_server()
    client = subprocess.Popen(
        client_command(server.port, "1,2,3", workload, options=("--timeout", "3")),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_progress(server, 200)
    server.stop(signal.SIGKILL)
    stdout, stderr = client.communicate(timeout=30)
    assert client.returncode == 1
    assert f"error: lost the server at 127.0.0.1:{server.port}" in stderr and "Traceback" not in stderr
    rate = float(last_line(stdout))
    assert 0.0 <= rate <= 1.0


def test_a_restarted_server_is_reconnected_to_and_given_the_coefficients_again(tmp_path):
    workload = long_workload(tmp_path, rows=6000)
    server = start_server()
    port = server.port
    client = subprocess.Popen(
        client_command(port, "1,2,3", workload, options=("--timeout", "20")),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_progress(server, 200)
        server.stop(signal.SIGKILL)
        with start_server(port=port) as restarted:
            stdout, stderr = client.communicate(timeout=120)
            answered_after_restart = stats(restarted)
    finally:
        client.kill()
    assert client.returncode == 0, stderr
    assert "sending the coefficients again" in stderr
    assert answered_after_restart.hits + answered_after_restart.misses > 0
    assert 0.0 <= float(last_line(stdout)) <= 1.0


# --- what a careless user hands the client ------------------------------------------------------


def test_a_csv_saved_with_a_byte_order_mark_loses_no_row(server, tmp_path):
    workload = tmp_path / "spreadsheet.csv"
    workload.write_bytes(b"\xef\xbb\xbf" + (WORKLOADS / "lru_order.csv").read_bytes())
    result = run_client(server.port, "1,2,3", workload)
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == "0.3333333333333333"
    assert "header skipped" not in result.stderr


def test_a_first_row_with_one_typo_is_a_malformed_row_not_a_header(server, tmp_path):
    workload = tmp_path / "typo.csv"
    workload.write_text("1,2,x3\n4,5,6\n")
    result = run_client(server.port, "1,2,3", workload)
    assert result.returncode == 1
    assert f"{workload}:1: skipped, not a number: 'x3'" in result.stderr
    assert "header skipped" not in result.stderr and last_line(result.stdout) == "0.0"


@pytest.mark.parametrize("content", ["", "\n\n", "x,y,z\n"], ids=["empty", "blank-lines", "header-only"])
def test_a_file_without_rows_is_one_line_and_exit_2_before_any_call(server, tmp_path, content):
    workload = tmp_path / "nothing.csv"
    workload.write_text(content)
    before = stats(server)
    result = run_client(server.port, "1,2,3", workload)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {workload} has no rows to predict (it is empty or holds only a header)"
    ]
    assert stats(server).hits + stats(server).misses == before.hits + before.misses


def test_a_field_over_the_csv_limit_is_one_line_and_exit_1(server, tmp_path):
    workload = tmp_path / "huge-field.csv"
    workload.write_text("1,2,3\n" + "1" * 200_000 + ",2,3\n4,5,6\n")
    result = run_client(server.port, "1,2,3", workload)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {workload}:2: field larger than field limit (131072); the rest of the file is skipped" in (
        result.stderr
    )
    assert last_line(result.stdout) == "0.0"


def peak_memory_mb(pid: int) -> float:
    status = (Path("/proc") / str(pid) / "status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def test_a_big_csv_is_streamed_in_bounded_memory_with_progress_lines_when_stderr_is_not_a_terminal(server, tmp_path):
    workload = tmp_path / "big.csv"
    row = "0.1234,5.6789,-3.25\n"
    with workload.open("w") as file:
        for _ in range(60):
            file.write(row * 50_000)  # 3,000,000 rows, 60 MB
    coefs_before = stats(server)
    client = subprocess.Popen(
        client_command(server.port, "1,2,3", workload, options=("--progress-every", "0.2")),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_progress(server, coefs_before.hits + coefs_before.misses + 2000)
        peak = peak_memory_mb(client.pid)
    finally:
        client.kill()
        _, stderr = client.communicate(timeout=30)
    assert peak < 250, f"the client's memory peaked at {peak:.0f} MB"
    assert "progress: " in stderr and "of about 3,000,000 rows" in stderr


def test_coefficients_may_start_with_a_minus_sign(server):
    result = run_client(server.port, "-1,2,3", WORKLOADS / "lru_order.csv")
    assert result.returncode == 0, result.stderr
    assert last_line(result.stdout) == "0.3333333333333333"


@pytest.mark.parametrize("port", ["0", "65536", "-5"])
def test_a_port_out_of_range_is_a_usage_error_at_once(port):
    started = time.monotonic()
    result = subprocess.run(
        [*CLIENT, port, "1,2,3", str(WORKLOADS / "lru_order.csv")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and "must be from 1 to 65535" in result.stderr
    assert time.monotonic() - started < 10
