"""Score the project as graders do: build and run the Docker image, then test it over gRPC and with client.py.

    python3 autograde.py            the course's procedure in Docker (below)
    python3 autograde.py --local    the same gRPC and client checks against server.py, without Docker

The course's procedure: build the image; run it with this folder bind-mounted as its working directory
(`docker run --rm -d -w /autograde -v .:/autograde`); wait a fixed 5 s; `docker exec` a script from this
folder (this one, with --run-checks) that imports the folder's stubs, calls the server on 127.0.0.1:5440,
runs client.py, and writes its results into the folder; read them back on the host.

Prints a table and `Score: N/100`, writes the results as JSON, exits 1 if any test failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOADS = HERE / "workloads"
CONTAINER_PORT = 5440
ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")
DOCKER_NOTICES = ("DEPRECATED: The legacy builder", "Install the buildx component", "docs.docker.com/go/buildx")
CONTAINER_FOLDER = "/autograde"
GRADERS_WAIT = 5.0  # seconds: the graders' fixed sleep between `docker run` and `docker exec`
INSIDE_RESULTS = "autograde_inside.json"  # what the in-container run writes into the bind-mounted folder

# Each test's points; the checks that run inside the container are all but the first two.
WEIGHTS = {
    "docker_build_run": 10,
    "run_docker_autograde": 0,
    "protobuf_interface": 10,
    "set_coefs": 10,
    "predict": 10,
    "predict_single_call_cache": 10,
    "predict_full_cache_eviction": 10,
    "set_coefs_cache_invalidation": 10,
    "client_workload_1": 10,
    "client_workload_2": 10,
    "client_workload_3": 10,
}
DOCKER_TESTS = ("docker_build_run", "run_docker_autograde")

# The four contract messages: field name -> (label, type), as FieldDescriptor names them.
PROTO_CONTRACT = {
    "SetCoefsRequest": {"coefs": ("LABEL_REPEATED", "TYPE_FLOAT")},
    "SetCoefsResponse": {"error": ("LABEL_OPTIONAL", "TYPE_STRING")},
    "PredictRequest": {"X": ("LABEL_REPEATED", "TYPE_FLOAT")},
    "PredictResponse": {
        "y": ("LABEL_OPTIONAL", "TYPE_FLOAT"),
        "hit": ("LABEL_OPTIONAL", "TYPE_BOOL"),
        "error": ("LABEL_OPTIONAL", "TYPE_STRING"),
    },
}
WORKLOAD_1 = ["no_repeats.csv"]  # no input repeats: exactly 0.0
WORKLOAD_2 = ["lru_order.csv"]  # 7 hits in 21 rows under LRU (FIFO eviction would give 6)
WORKLOAD_2_RATE = "0.3333333333333333"
WORKLOAD_3 = ["threads_a.csv", "threads_b.csv", "threads_c.csv"]


class CheckError(Exception):
    pass


@dataclass
class Result:
    name: str
    weight: int
    status: str  # passed, failed or skipped
    detail: str = ""


# --- the checks that talk to a running server ---------------------------------------------------


def run_checks(host: str, port: int) -> list[Result]:
    """Run every gRPC and client check against host:port; never raises."""
    import grpc

    from stubs import join_address

    with grpc.insecure_channel(join_address(host, port)) as channel:
        checks = CourseChecks(channel, port)
        return [run_check(name, check) for name, check in checks.by_name().items()]


class CourseChecks:
    """The course's checks, one method each, over one channel to the server under test."""

    def __init__(self, channel, port: int):
        from stubs import pb2, pb2_grpc

        self.pb2 = pb2
        self.stub = pb2_grpc.ModelServerStub(channel)
        self.port = port

    def by_name(self) -> dict[str, Callable[[], None]]:
        return {
            "protobuf_interface": self.protobuf_interface,
            "set_coefs": lambda: self.set_coefs([1, 2, 3]),
            "predict": self.predict_values,
            "predict_single_call_cache": self.single_call_cache,
            "predict_full_cache_eviction": self.full_cache_eviction,
            "set_coefs_cache_invalidation": self.cache_invalidation,
            "client_workload_1": lambda: expect_last_line(self.port, WORKLOAD_1, "0.0"),
            "client_workload_2": lambda: expect_last_line(self.port, WORKLOAD_2, WORKLOAD_2_RATE),
            "client_workload_3": self.workload_3,
        }

    def set_coefs(self, coefs: list[float]) -> None:
        reply = self.stub.SetCoefs(self.pb2.SetCoefsRequest(coefs=coefs), timeout=10, wait_for_ready=True)
        expect(reply.error == "", f"SetCoefs answered error {reply.error!r}")

    def predict(self, *x: float):
        reply = self.stub.Predict(self.pb2.PredictRequest(X=x), timeout=10)
        expect(reply.error == "", f"Predict{x} answered error {reply.error!r}")
        return reply

    def protobuf_interface(self) -> None:
        for message, expected in PROTO_CONTRACT.items():
            with warnings.catch_warnings():  # graders read .label; protobuf 6 deprecates it but still has it
                warnings.simplefilter("ignore", DeprecationWarning)
                descriptor = self.pb2.DESCRIPTOR.message_types_by_name[message]
                fields = {f.name: (f.label, f.type) for f in descriptor.fields}
            named = {
                name: (_enum_name("LABEL", label), _enum_name("TYPE", kind)) for name, (label, kind) in fields.items()
            }
            expect(named == expected, f"{message} has {named}, expected {expected}")

    def predict_values(self) -> None:
        self.set_coefs([1, 2, 3])
        y = self.predict(1, 2, 3).y
        expect(y == 14.0, f"[1,2,3]·[1,2,3] gave {y}, expected 14")
        x = (0.1234, 2.5, -1.75)
        y, expected_y = self.predict(*x).y, 0.1234 * 1 + 2.5 * 2 - 1.75 * 3
        expect(math.isclose(y, expected_y, abs_tol=1e-4), f"{x}·[1,2,3] gave {y}, expected {expected_y:.4f}")

    def single_call_cache(self) -> None:
        self.set_coefs([1, 2, 3])
        first, second = self.predict(4, 5, 6), self.predict(4, 5, 6)
        expect(not first.hit and second.hit, f"hit flags {first.hit}, {second.hit}; expected False, True")

    def full_cache_eviction(self) -> None:
        self.set_coefs([1, 2, 3])
        self.predict(1, 1, 1)
        for i in range(10):
            self.predict(100 + i, 0, 0)
        expect(not self.predict(1, 1, 1).hit, "the first input still hit after 10 other inputs")

    def cache_invalidation(self) -> None:
        self.set_coefs([1, 2, 3])
        self.predict(7, 8, 9)
        expect(self.predict(7, 8, 9).hit, "the repeated input did not hit before SetCoefs")
        self.set_coefs([1, 2, 3])
        expect(not self.predict(7, 8, 9).hit, "the input still hit after SetCoefs")

    def workload_3(self) -> None:
        before = self.stub.GetStats(self.pb2.GetStatsRequest(), timeout=10)
        rate = float(client_last_line(self.port, WORKLOAD_3))
        after = self.stub.GetStats(self.pb2.GetStatsRequest(), timeout=10)
        rows = sum(count_rows(WORKLOADS / name) for name in WORKLOAD_3)
        counted = (after.hits + after.misses) - (before.hits + before.misses)
        expect(0.0 <= rate <= 1.0, f"hit rate {rate} is outside [0, 1]")
        expect(counted == rows, f"the server answered {counted} predictions for {rows} rows")


def run_check(name: str, check: Callable[[], None]) -> Result:
    try:
        check()
    except Exception as error:  # a grader reports every failure as a result, whatever raised it
        detail = str(error) if isinstance(error, CheckError) else f"{type(error).__name__}: {error}"
        return Result(name, WEIGHTS[name], "failed", detail.strip().splitlines()[0] if detail.strip() else "")
    return Result(name, WEIGHTS[name], "passed")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckError(message)


def _enum_name(prefix: str, value: int) -> str:
    from google.protobuf.descriptor import FieldDescriptor

    return next(
        name
        for name in dir(FieldDescriptor)
        if name.startswith(prefix + "_") and getattr(FieldDescriptor, name) == value
    )


def count_rows(path: Path) -> int:
    """The rows client.py sends for this file, parsed by client.py itself."""
    from client import Row, data_rows

    return sum(isinstance(row, Row) for row in data_rows(str(path)))


def client_last_line(port: int, workloads: list[str]) -> str:
    command = [
        sys.executable,
        str(HERE / "client.py"),
        str(port),
        "1,2,3",
        *(str(WORKLOADS / name) for name in workloads),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    expect(result.returncode == 0, f"client.py exited {result.returncode}: {result.stderr.strip()[-300:]}")
    lines = result.stdout.strip().splitlines()
    expect(bool(lines), "client.py printed nothing on stdout")
    return lines[-1]


def expect_last_line(port: int, workloads: list[str], expected: str) -> None:
    line = client_last_line(port, workloads)
    expect(line == expected, f"client.py printed {line!r}, expected {expected!r}")


# --- Docker -------------------------------------------------------------------------------------


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise CheckError("the docker command is not installed (use --local to grade without Docker)") from None
    if check and result.returncode != 0:
        raise CheckError(f"docker {args[0]} failed: {failure_reason(result)}")
    return result


def failure_reason(result: subprocess.CompletedProcess) -> str:
    """What a failed docker command said, in one line: the error lines of a build's steps (pip's are on
    stdout), then Docker's own last word; its notices (the legacy builder's) are left out."""
    lines = [ANSI_COLOR.sub("", line).strip() for line in f"{result.stdout}\n{result.stderr}".splitlines()]
    said = [line for line in lines if line and not any(notice in line for notice in DOCKER_NOTICES)]
    errors = [line for line in said if line.startswith("ERROR")]
    return "; ".join([*errors[-3:], said[-1]] if said else ["no output"])[-600:]


def build_image(image: str) -> None:
    """`docker build -t IMAGE .`, with the sandbox's index and network where its variables are set."""
    extra = []
    if os.environ.get("TORCH_INDEX_URL"):
        extra += ["--build-arg", f"TORCH_INDEX_URL={os.environ['TORCH_INDEX_URL']}"]
    if os.environ.get("DOCKER_BUILD_NETWORK"):
        extra += ["--network", os.environ["DOCKER_BUILD_NETWORK"]]
    docker("build", *extra, "-t", image, str(HERE), timeout=1800)


def wait_healthy(container: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = docker("inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", container).stdout.split()
        if state == ["running", "healthy"]:
            return
        expect(state[0] == "running", f"the container stopped: {docker('logs', container, check=False).stderr[-400:]}")
        time.sleep(0.5)  # Docker has no call that blocks until healthy
    raise CheckError(f"the container was not healthy within {timeout:.0f} s")


def run_in_container(container: str) -> list[Result]:
    """`docker exec` this script from the bind-mounted folder; it writes its results there for the host to read."""
    results_file = HERE / INSIDE_RESULTS
    results_file.unlink(missing_ok=True)
    try:
        docker("exec", container, "python3", "autograde.py", "--run-checks", "--json", INSIDE_RESULTS, timeout=600)
        return [Result(**fields) for fields in json.loads(results_file.read_text())]
    finally:
        results_file.unlink(missing_ok=True)


def start_graders_container(image: str, container: str) -> None:
    """`docker run` as graders do, then their fixed wait; the container must still run after it."""
    docker("run", "--rm", "-d", "--name", container, "-w", CONTAINER_FOLDER, "-v", f"{HERE}:{CONTAINER_FOLDER}", image)
    time.sleep(GRADERS_WAIT)  # the procedure's own fixed wait, not a readiness check: SERVING must come within it
    state = docker("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
    expect(state == "running", f"the container is not running after {GRADERS_WAIT:g} s: {state or 'gone'}")


def all_failed_after_build(detail: str) -> list[Result]:
    """Every test after docker_build_run, failed for one reason."""
    return [Result(name, weight, "failed", detail) for name, weight in WEIGHTS.items() if name != "docker_build_run"]


def grade_docker(image: str) -> list[Result]:
    container = f"autograde-{os.getpid()}"
    results = []
    try:
        try:
            build_image(image)
            start_graders_container(image, container)
        except (CheckError, subprocess.TimeoutExpired) as error:
            failed = Result("docker_build_run", WEIGHTS["docker_build_run"], "failed", str(error))
            return [failed, *all_failed_after_build("the container did not start")]
        results.append(Result("docker_build_run", WEIGHTS["docker_build_run"], "passed"))
        try:
            inside = run_in_container(container)
        except (CheckError, subprocess.TimeoutExpired, OSError, ValueError, TypeError) as error:
            return results + all_failed_after_build(f"in-container runner: {error}")
        return [*results, Result("run_docker_autograde", 0, "passed"), *inside]
    finally:
        docker("rm", "-f", container, check=False)


def grade_local() -> list[Result]:
    from serverproc import start_server

    skipped = [Result(name, WEIGHTS[name], "skipped", "--local: no Docker") for name in DOCKER_TESTS]
    with start_server() as server:
        return skipped + run_checks("127.0.0.1", server.port)


# --- reporting ----------------------------------------------------------------------------------


def report(results: list[Result], json_path: Path) -> int:
    """Print the table and the score, write the JSON; the exit code is 1 if any test failed."""
    width = max(len(result.name) for result in results)
    for result in results:
        print(f"{result.name:<{width}}  {result.status:<7}  {result.weight:>3}  {result.detail}".rstrip())
    score = sum(result.weight for result in results if result.status == "passed")
    skipped = sum(result.weight for result in results if result.status == "skipped")
    print(f"Score: {score}/100" + (f" ({skipped} points skipped)" if skipped else ""))
    json_path.write_text(json.dumps({"score": score, "tests": [asdict(r) for r in results]}, indent=2) + "\n")
    return 1 if any(result.status == "failed" for result in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", action="store_true", help="test server.py directly, without Docker")
    parser.add_argument("--image", default="p3", help="image tag to build and run (default %(default)s)")
    parser.add_argument("--json", type=Path, default=Path("autograde_results.json"), help="where to write results")
    parser.add_argument("--run-checks", action="store_true", help=argparse.SUPPRESS)  # the in-container runner
    parser.add_argument("--port", type=int, default=CONTAINER_PORT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_checks:
        results = run_checks("127.0.0.1", args.port)
        args.json.write_text(json.dumps([asdict(result) for result in results]) + "\n")
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `finally` removes the container either way
    try:
        results = grade_local() if args.local else grade_docker(args.image)
    except KeyboardInterrupt:
        print("interrupted; the container was removed", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as error:
        print(f"error: could not start server.py: {error}", file=sys.stderr)
        return 1
    return report(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
