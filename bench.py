"""Closed-loop benchmark of Predict, measured against the gRPC floor in the same run.

    python3 bench.py --floor                        server.py and a bare constant-answer server, alternately
    python3 bench.py --mode miss --concurrency 16   one mode, one level
    python3 bench.py --port 5440                    an already running server (no CPU figures)
    python3 bench.py --floor --instructions         also instructions per request under valgrind (minutes)
    python3 bench.py --ray 2 --concurrency 1,16     also 2 replicas behind Ray Serve's gRPC proxy (Ray installed)

N concurrent callers on one grpc.aio channel call Predict for a fixed time; per level it reports requests
per second, p50/p90/p99 latency, the hit rate, and the server's CPU time per request (read from
/proc for servers it starts). With --floor every figure is also given as the ratio server / floor, the median
over pairs of rounds run side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import logging
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from tqdm import tqdm

from serverproc import SERVER_PY, FleetProcess, ServerProcess, free_port, start_server, wait_until_serving
from stubs import join_address, pb2, pb2_grpc

BENCH_PY = Path(__file__).resolve()
COEFS = [1.0, 2.0, 3.0]
MODES = ("hit", "miss", "mix")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- the floor: the same service and pool, answering a constant ---------------------------------


class ConstantModelServer(pb2_grpc.ModelServerServicer):
    def SetCoefs(self, request, context):
        return pb2.SetCoefsResponse()

    def Predict(self, request, context):
        return pb2.PredictResponse(y=1.0)


def serve_floor(host: str, port: int, workers: int) -> int:
    from grpc_health.v1 import health, health_pb2_grpc

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=(("grpc.so_reuseport", 0),))
    pb2_grpc.add_ModelServerServicer_to_server(ConstantModelServer(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    bound = server.add_insecure_port(join_address(host, port))
    server.start()
    print(f"ready: serving on {host}:{bound} (floor, {workers} workers)", file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(1).wait()
    return 0


# --- load ---------------------------------------------------------------------------------------


UNSEEN = itertools.count()  # shared by every round, so a miss is never a row the server has seen before


def inputs(mode: str) -> Iterator[list[float]]:
    """hit: one X forever; miss: a new X every call; mix: a skewed draw from 30 Xs, like a workload."""
    if mode == "hit":
        return itertools.repeat([1.0, 2.0, 3.0])
    if mode == "miss":
        return ([float(i), 0.5, 0.25] for i in UNSEEN)
    chooser = random.Random(544)
    keys = [[float(k), 1.0, 2.0] for k in range(30)]
    weights = [1 / (rank + 1) for rank in range(len(keys))]
    return (chooser.choices(keys, weights)[0] for _ in itertools.count())


@dataclass
class Round:
    target: str
    concurrency: int
    requests: int
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    hit_rate: float
    cpu_us_per_request: float | None
    rows_per_second: float


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


async def drive(
    address: str, concurrency: int, seconds: float, mode: str, credentials, *, rows_per_call: int = 1
) -> tuple[list[float], int]:
    """Closed loop: each caller sends its next request when the last one returns: a unary Predict, or a
    ModelInfer of `rows_per_call` rows. Returns the calls' latencies and the rows answered from the cache."""
    channel = grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    async with channel:
        call = batched_call(channel, rows_per_call) if rows_per_call > 1 else unary_call(channel)
        source = inputs(mode)
        latencies: list[float] = []
        hits = 0
        end = time.perf_counter() + seconds

        async def caller():
            nonlocal hits
            while (started := time.perf_counter()) < end:
                cached = await call(source)  # awaited first: `hits += await ...` would read hits before the wait
                latencies.append(time.perf_counter() - started)
                hits += cached

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, hits


def unary_call(channel: grpc.aio.Channel):
    stub = pb2_grpc.ModelServerStub(channel)

    async def call(source: Iterator[list[float]]) -> int:
        reply = await stub.Predict(pb2.PredictRequest(X=next(source)), timeout=10)
        return int(reply.hit)

    return call


def batched_call(channel: grpc.aio.Channel, rows: int):
    from inference_server import oip, oip_grpc

    stub = oip_grpc.GRPCInferenceServiceStub(channel)

    async def call(source: Iterator[list[float]]) -> int:
        request = oip.ModelInferRequest(model_name="linear")
        request.inputs.add(name="X", datatype="FP32", shape=[rows, len(COEFS)])
        request.raw_input_contents.append(
            array("f", itertools.chain.from_iterable(itertools.islice(source, rows))).tobytes()
        )
        reply = await stub.ModelInfer(request, timeout=10)
        return reply.parameters["cached_rows"].int64_param

    return call


def measure(
    target: str,
    address: str,
    pid: int | None,
    *,
    concurrency: int,
    seconds: float,
    mode: str,
    credentials,
    rows_per_call: int = 1,
) -> Round:
    warm_up = min(0.5, seconds / 4)
    asyncio.run(drive(address, concurrency, warm_up, mode, credentials, rows_per_call=rows_per_call))
    cpu_before = process_cpu_seconds(pid) if pid else 0.0
    started = time.perf_counter()
    latencies, hits = asyncio.run(drive(address, concurrency, seconds, mode, credentials, rows_per_call=rows_per_call))
    elapsed = time.perf_counter() - started
    cpu = process_cpu_seconds(pid) - cpu_before if pid else None
    cuts = statistics.quantiles(latencies, n=100)
    return Round(
        target,
        concurrency,
        len(latencies),
        len(latencies) / elapsed,
        cuts[49] * 1e6,
        cuts[89] * 1e6,
        cuts[98] * 1e6,
        hits / (len(latencies) * rows_per_call),
        cpu / len(latencies) * 1e6 if cpu is not None else None,
        len(latencies) * rows_per_call / elapsed,
    )


def median_round(rounds: list[Round]) -> Round:
    def median(name):
        values = [getattr(r, name) for r in rounds]
        return None if None in values else statistics.median(values)

    first = rounds[0]
    return Round(
        first.target,
        first.concurrency,
        sum(r.requests for r in rounds),
        median("rps"),
        median("p50_us"),
        median("p90_us"),
        median("p99_us"),
        median("hit_rate"),
        median("cpu_us_per_request"),
        median("rows_per_second"),
    )


# --- microbenchmarks ----------------------------------------------------------------------------


class StraightforwardCache:
    """The obvious implementation, timed beside PredictionCache so the speed-up survives a noisy machine."""

    def __init__(self, coefs):
        import threading
        from collections import OrderedDict

        import torch

        self.torch, self.coefs, self.lock, self.entries = torch, coefs, threading.Lock(), OrderedDict()

    def Predict(self, X):
        X = self.torch.round(X, decimals=4)
        key = tuple(X.flatten().tolist())
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key], True
        y = X @ self.coefs
        with self.lock:
            self.entries[key] = y
            if len(self.entries) > 10:
                self.entries.popitem(last=False)
        return y, False


def predict_next(cache, rows: Iterator) -> object:
    """One in-process Predict of the next row never sent before: a miss."""
    return cache.Predict(next(rows))


def microbenchmarks(repeats: int = 7, number: int = 20000) -> dict[str, float]:
    """Median µs per Predict call on one row of 3 values, hit and miss, ours and the straightforward one,
    timed in interleaved repeats so the machine's drift touches every figure alike."""
    import torch

    from server import PredictionCache

    coefs = torch.tensor([[1.0], [2.0], [3.0]])
    ours = PredictionCache()
    ours.SetCoefs(coefs)
    calls: dict[str, Callable[[], object]] = {}
    for name, cache in (("predict", ours), ("straightforward", StraightforwardCache(coefs))):
        same = torch.tensor([[1.0, 2.0, 3.0]])
        cache.Predict(same)
        misses = iter([torch.tensor([[i + 0.5, 2.0, 3.0]]) for i in range(repeats * number)])
        calls[f"{name}_hit_us"] = functools.partial(cache.Predict, same)
        calls[f"{name}_miss_us"] = functools.partial(predict_next, cache, misses)
    calls["predict_row_hit_us"] = functools.partial(ours.predict_row, [1.0, 2.0, 3.0])
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            timings[name].append(timeit.timeit(call, number=number) / number * 1e6)
    figures = {name: statistics.median(values) for name, values in timings.items()}
    for path in ("hit", "miss"):
        figures[f"{path}_vs_straightforward"] = figures[f"predict_{path}_us"] / figures[f"straightforward_{path}_us"]
    return figures


def start_to_serving_seconds(times: int = 3) -> float:
    durations = []
    for _ in range(times):
        started = time.perf_counter()
        with start_server():
            durations.append(time.perf_counter() - started)
    return statistics.median(durations)


# --- instruction counts: the figure a busy machine cannot move ----------------------------------


def instructions_per_request(modes: Sequence[str], seconds: float) -> list[dict]:
    """Instructions the floor, server.py, and server.py with metrics on execute per Predict under 16 callers,
    counted by valgrind's callgrind after a warm-up: unlike seconds, the count is the same on a busy machine
    as on an idle one."""
    counts: dict[str, dict[str, float]] = {}
    targets: tuple[tuple[str, list[str], Path], ...] = (
        ("floor", ["--serve-floor"], BENCH_PY),
        ("server", [], SERVER_PY),
        ("metrics", ["--metrics-port", str(free_port())], SERVER_PY),
    )
    with tempfile.TemporaryDirectory() as folder:
        for name, args, script in targets:
            output = Path(folder) / f"{name}.callgrind"
            wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={output}"]
            server = start_server(args, timeout=900, script=script, wrapper=wrapper)
            try:
                set_coefs(server.address, None)
                counts[name] = {
                    mode: counted_run(server, output, mode, seconds, dump) for dump, mode in enumerate(modes, 1)
                }
            finally:
                server.stop()
    return [
        {
            "mode": mode,
            "floor": round(counts["floor"][mode]),
            "server": round(counts["server"][mode]),
            "ratio": round(counts["server"][mode] / counts["floor"][mode], 3),
            "with_metrics": round(counts["metrics"][mode]),
            "metrics_cost": round(counts["metrics"][mode] / counts["server"][mode], 3),
        }
        for mode in modes
    ]


def counted_run(server: ServerProcess, output: Path, mode: str, seconds: float, dump: int) -> float:
    """Warm up, zero the counters, drive the load, dump: instructions per request of that load alone."""
    asyncio.run(drive(server.address, 16, 2.0, mode, None))
    callgrind_control("--zero", server.process.pid)
    latencies, _ = asyncio.run(drive(server.address, 16, seconds, mode, None))
    callgrind_control("--dump", server.process.pid)
    dumped = Path(f"{output}.{dump}").read_text().splitlines()
    summary = next((line for line in dumped if line.startswith(("summary:", "totals:"))), None)
    if summary is None:
        raise RuntimeError(f"callgrind's dump {output}.{dump} has no instruction total")
    return int(summary.split()[1]) / len(latencies)


def callgrind_control(action: str, pid: int) -> None:
    subprocess.run(["callgrind_control", action, str(pid)], check=True, capture_output=True, timeout=120)


# --- running and reporting ----------------------------------------------------------------------


@dataclass
class Target:
    name: str
    address: str
    pid: int | None
    process: ServerProcess | FleetProcess | None
    rows_per_call: int = 1


def start_targets(args: argparse.Namespace) -> list[Target]:
    if args.port:
        targets = [Target("server", join_address(args.host, args.port), None, None)]
    else:
        server = start_server()
        targets = [Target("server", server.address, server.process.pid, server)]
    if args.batch:  # the same server, asked through ModelInfer
        targets.append(Target("batch", targets[0].address, targets[0].pid, None, rows_per_call=args.batch))
    if args.floor:
        floor = start_server(["--serve-floor"], script=BENCH_PY)
        targets.insert(0, Target("floor", floor.address, floor.process.pid, floor))
    if args.ray:  # the same code as replicas behind Ray Serve's gRPC proxy, on the same machine
        fleet = FleetProcess(args.ray)
        targets.append(Target("ray", fleet.address, None, fleet))
    return targets


def open_channel(address: str, credentials) -> grpc.Channel:
    return grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)


def set_coefs(address: str, credentials) -> None:
    with open_channel(address, credentials) as channel:
        wait_until_serving(channel, timeout=30)
        reply = pb2_grpc.ModelServerStub(channel).SetCoefs(pb2.SetCoefsRequest(coefs=COEFS), timeout=10)
    if reply.error:
        raise SystemExit(f"error: SetCoefs: {reply.error}")


def setcoefs_milliseconds(address: str, credentials, times: int = 10) -> dict[str, float]:
    """How long SetCoefs takes to return, idle: on a fleet, until every replica serves the coefficients."""
    with open_channel(address, credentials) as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        took = []
        for _ in range(times):
            started = time.perf_counter()
            stub.SetCoefs(pb2.SetCoefsRequest(coefs=COEFS), timeout=60)
            took.append((time.perf_counter() - started) * 1e3)
    return {"p50": statistics.median(took), "max": max(took)}


def run(args: argparse.Namespace) -> dict:
    credentials = grpc.ssl_channel_credentials(args.tls_ca.read_bytes()) if args.tls_ca else None
    targets = start_targets(args)
    try:
        for target in targets:
            set_coefs(target.address, credentials)
        setcoefs_ms = {
            target.name: setcoefs_milliseconds(target.address, credentials) for target in targets if args.ray
        }
        plan = [
            (mode, level, target)
            for mode in args.modes
            for level in args.concurrency
            for r in range(args.rounds)
            for target in (targets if r % 2 == 0 else targets[::-1])
        ]  # ABBA
        measured: dict[tuple, list[Round]] = {}
        for mode, level, target in tqdm(plan, desc="bench", unit="round", file=sys.stderr, disable=None):
            result = measure(
                target.name,
                target.address,
                target.pid,
                concurrency=level,
                seconds=args.duration,
                mode=mode,
                credentials=credentials,
                rows_per_call=target.rows_per_call,
            )
            measured.setdefault((mode, level, target.name), []).append(result)
    finally:
        for target in targets:
            if target.process:
                target.process.stop()
    results = [{"mode": mode, **asdict(median_round(rounds))} for (mode, _, _), rounds in measured.items()]
    report = {"machine": machine(), "duration_s": args.duration, "rounds": args.rounds, "results": results}
    if args.floor:
        report["ratios"] = ratios(measured, "server", "floor")
    if args.ray:
        report["ray_replicas"] = args.ray
        report["ray_ratios"] = ratios(measured, "ray", "server")
        report["setcoefs_ms"] = setcoefs_ms
    if args.batch:
        report["batch_rows"] = args.batch
        report["batch_ratios"] = [
            {
                "mode": mode,
                "concurrency": level,
                "rows_per_second": paired_ratio(rounds, measured[(mode, level, "server")], "rows_per_second"),
            }
            for (mode, level, target), rounds in measured.items()
            if target == "batch"
        ]
    if args.chart:
        draw_chart(report, args.chart)
    if args.micro:
        report["micro"] = microbenchmarks()
        report["start_to_serving_s"] = start_to_serving_seconds()
    if args.instructions:
        report["instructions"] = instructions_per_request(args.modes, seconds=max(args.duration, 5.0))
    return report


def ratios(measured: dict[tuple, list[Round]], subject: str, baseline: str) -> list[dict]:
    """subject / baseline for each figure, per mode and level: the median over pairs of rounds run side by
    side, which cancels the drift a shared machine shows from one minute to the next."""
    figures = ("rps", "p50_us", "p99_us", "cpu_us_per_request")
    out = []
    for (mode, level, target), subject_rounds in measured.items():
        baseline_rounds = measured.get((mode, level, baseline))
        if target != subject or not baseline_rounds:
            continue
        out.append(
            {
                "mode": mode,
                "concurrency": level,
                **{name: paired_ratio(subject_rounds, baseline_rounds, name) for name in figures},
            }
        )
    return out


def paired_ratio(server_rounds: list[Round], floor_rounds: list[Round], name: str) -> float | None:
    pairs = [
        (getattr(server, name), getattr(floor, name)) for server, floor in zip(server_rounds, floor_rounds, strict=True)
    ]
    quotients = [server / floor for server, floor in pairs if server and floor]
    return round(statistics.median(quotients), 3) if quotients else None


def machine() -> dict:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch.__version__,
    }


def print_tables(report: dict) -> None:
    print(f"machine: {report['machine']}")
    print(
        f"{'mode':<5} {'target':<6} {'clients':>7} {'rps':>8} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} "
        f"{'hit':>5} {'cpu µs/req':>10}"
    )
    for r in report["results"]:
        cpu = f"{r['cpu_us_per_request']:.0f}" if r["cpu_us_per_request"] is not None else "-"
        print(
            f"{r['mode']:<5} {r['target']:<6} {r['concurrency']:>7} {r['rps']:>8.0f} {r['p50_us']:>8.0f} "
            f"{r['p90_us']:>8.0f} {r['p99_us']:>8.0f} {r['hit_rate']:>5.2f} {cpu:>10}"
        )
    if "ratios" in report:
        print_ratios("server / floor", report["ratios"])
    if "ray_ratios" in report:
        print_ratios(f"Ray Serve proxy, {report['ray_replicas']} replicas / direct server", report["ray_ratios"])
        print(
            "\nSetCoefs until it returns, idle (ms): "
            + ", ".join(
                f"{target} p50 {took['p50']:.1f} max {took['max']:.1f}"
                for target, took in report["setcoefs_ms"].items()
            )
        )
    if "batch_ratios" in report:
        print(f"\nrows per second, ModelInfer of {report['batch_rows']} rows / unary Predict (paired rounds)")
        for r in report["batch_ratios"]:
            print(f"{r['mode']:<5} {r['concurrency']:>7} {r['rows_per_second']:>8.1f}")
    if "micro" in report:
        print(
            "\nin process (µs per call; *_vs_straightforward are ratios): "
            + ", ".join(f"{k} {v:.2f}" for k, v in report["micro"].items())
        )
        print(f"start to SERVING: {report['start_to_serving_s']:.2f} s")
    if "instructions" in report:
        print("\ninstructions per request under callgrind (16 callers)")
        print(f"{'mode':<5} {'floor':>9} {'server':>9} {'ratio':>6} {'metrics on':>10} {'on / off':>8}")
        for r in report["instructions"]:
            print(
                f"{r['mode']:<5} {r['floor']:>9} {r['server']:>9} {r['ratio']:>6.2f} "
                f"{r['with_metrics']:>10} {r['metrics_cost']:>8.3f}"
            )


def print_ratios(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'mode':<5} {'clients':>7} {'rps':>6} {'p50':>6} {'p99':>6} {'cpu/req':>8}")
    for r in rows:
        figures = ("rps", "p50_us", "p99_us", "cpu_us_per_request")
        cells = [f"{r[name]:.2f}" if r[name] is not None else "-" for name in figures]
        print(f"{r['mode']:<5} {r['concurrency']:>7} {cells[0]:>6} {cells[1]:>6} {cells[2]:>6} {cells[3]:>8}")


def draw_chart(report: dict, path: Path) -> None:
    """Rows per second against clients: unary Predict and batched ModelInfer per mode, beside the floor."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in report["results"]:
        label = {
            "floor": "floor (unary, constant answer)",
            "server": "unary Predict",
            "batch": f"ModelInfer, {report.get('batch_rows')} rows a call",
            "ray": f"unary Predict, Ray Serve proxy, {report.get('ray_replicas')} replicas",
        }[r["target"]]
        lines.setdefault(f"{label}, {r['mode']}", []).append((r["concurrency"], r["rows_per_second"]))
    for label, points in sorted(lines.items()):
        clients, rows = zip(*sorted(points), strict=True)
        axes.plot(clients, rows, marker="o", label=label)
    axes.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="rows per second")
    levels = sorted({r["concurrency"] for r in report["results"]})
    axes.set_xticks(levels, labels=[str(level) for level in levels])
    axes.minorticks_off()
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(f"{report['machine']['cores']} cores, {report['machine']['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def concurrency_list(text: str) -> list[int]:
    try:
        levels = [int(cell) for cell in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,16, got {text!r}") from None
    if any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("every concurrency level must be at least 1")
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="host of --port's server (default %(default)s)")
    parser.add_argument("--port", type=int, help="benchmark a running server instead of starting server.py")
    parser.add_argument(
        "--concurrency", type=concurrency_list, default=[1, 4, 16], help="callers per level (default 1,4,16)"
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per round (default %(default)s)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=6,
        help="rounds per target and level; many short ones follow the machine's drift (default %(default)s)",
    )
    parser.add_argument(
        "--mode", dest="modes", action="append", choices=MODES, help="hit, miss or mix; repeatable (default all)"
    )
    parser.add_argument("--floor", action="store_true", help="also drive a constant-answer server, alternately")
    parser.add_argument("--micro", action="store_true", help="add in-process microbenchmarks and start-to-SERVING time")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="add instructions per request, server vs floor, counted under valgrind (slow: minutes)",
    )
    parser.add_argument(
        "--batch", type=int, metavar="ROWS", help="also send ModelInfer calls of ROWS rows to the server, alternately"
    )
    parser.add_argument(
        "--ray",
        type=int,
        metavar="REPLICAS",
        help="also drive REPLICAS replicas behind Ray Serve's gRPC proxy, alternately (needs make setup-ray)",
    )
    parser.add_argument("--chart", type=Path, help="draw rows per second against clients into this PNG")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate for a TLS server given by --port")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.modes = args.modes or list(MODES)
    if (args.floor or args.instructions) and args.port:
        parser.error("--floor and --instructions start their own servers; leave out --port")
    if args.instructions and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        parser.error("--instructions needs valgrind on the PATH (Debian/Ubuntu: apt install valgrind)")
    if args.ray is not None and args.ray < 1:
        parser.error(f"--ray needs at least 1 replica, got {args.ray}")
    if args.tls_ca and not args.port:
        parser.error("--tls-ca is for a running TLS server given by --port (the servers bench.py starts are plaintext)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_floor:
        return serve_floor(args.host, args.port or 0, args.workers)
    logging.disable(logging.WARNING)
    try:
        report = run(args)
    except (RuntimeError, TimeoutError, grpc.RpcError, OSError, subprocess.SubprocessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_tables(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
