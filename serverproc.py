"""Run server.py as a child process on loopback and wait until its health service says SERVING, or a
Ray Serve fleet of it with deploy/ray/fleet.py.

Used by the tests, `autograde.py --local` and `bench.py`, which all need a real server to talk to.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVER_PY = Path(__file__).resolve().parent / "server.py"
FLEET_PY = SERVER_PY.parent / "deploy" / "ray" / "fleet.py"
FLEET_START_TIMEOUT = 300  # seconds: Ray, Serve, its proxies and the replicas on 2 busy cores
READY_LINE = re.compile(r"ready: serving on \S*:(\d+)")


def free_port() -> int:
    """A port nobody listens on now, for a server that must start after its client, or a second endpoint."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(channel: grpc.Channel, timeout: float, service: str = "") -> None:
    """Block until the health service answers SERVING; raise TimeoutError after `timeout` seconds."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=remaining, wait_for_ready=True)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            break
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.05)  # reachable but not yet SERVING: there is nothing to block on, so poll
    raise TimeoutError(f"the server was not SERVING within {timeout:.0f} s")


class ServerProcess:
    """A server.py child process; its stderr is kept in `log_lines`."""

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int = 0,
        env: dict | None = None,
        start_timeout: float = 30,
        script: Path = SERVER_PY,
        wrapper: Sequence[str] = (),
    ):
        command = [*wrapper, sys.executable, "-u", str(script), "--host", "127.0.0.1", "--port", str(port), *args]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.log_lines: list[str] = []
        self.port = port
        self._ready = False
        self._ready_or_exited = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._ready_or_exited.wait(start_timeout) or not self._ready:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"{script.name} did not start:\n" + self.log)

    def _read_log(self) -> None:
        assert self.process.stderr is not None  # Popen(stderr=PIPE)
        for line in self.process.stderr:
            self.log_lines.append(line)
            if match := READY_LINE.search(line):
                self.port, self._ready = int(match.group(1)), True
                self._ready_or_exited.set()
        self._ready_or_exited.set()  # exited: whoever waits learns it now rather than at the timeout

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, tls_ca: bytes | None = None) -> grpc.Channel:
        if tls_ca is None:
            return grpc.insecure_channel(self.address)
        options = (("grpc.ssl_target_name_override", "localhost"),)
        return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(tls_ca), options=options)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send `sig` and return the exit code; SIGKILL if it has not exited within `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    args: Sequence[str] = (),
    *,
    port: int = 0,
    env: dict | None = None,
    timeout: float = 30,
    tls_ca: bytes | None = None,
    script: Path = SERVER_PY,
    wrapper: Sequence[str] = (),
) -> ServerProcess:
    """Start server.py (or another script that logs the same ready line), run under `wrapper` if given
    (a profiler's command line), and return once it is SERVING."""
    server = ServerProcess(args, port=port, env=env, start_timeout=timeout, script=script, wrapper=wrapper)
    try:
        with server.channel(tls_ca) as channel:
            wait_until_serving(channel, timeout)
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server


class FleetProcess:
    """A local Ray Serve fleet started by `fleet.py up` on free ports and a Ray folder of its own, as
    `make serve-ray` starts one; `stop()` runs `fleet.py down`, which stops every Ray process here."""

    def __init__(self, replicas: int, options: Sequence[str] = (), env: dict | None = None):
        self.port = free_port()
        self._temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
        up = [sys.executable, str(FLEET_PY), "up", f"--replicas={replicas}", f"--grpc-port={self.port}"]
        up += [f"--http-port={free_port()}", f"--gcs-port={free_port()}", f"--temp-dir={self._temp_dir}", *options]
        try:
            started = subprocess.run(
                up, capture_output=True, text=True, timeout=FLEET_START_TIMEOUT, check=False, env=env
            )
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        if started.returncode != 0:
            self.stop()
            raise RuntimeError(f"fleet.py up failed:\n{started.stderr[-3000:]}")
        self.ready_line = started.stdout.strip().splitlines()[-1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        subprocess.run([sys.executable, str(FLEET_PY), "down"], capture_output=True, timeout=120, check=False)
        shutil.rmtree(self._temp_dir, ignore_errors=True)

    def __enter__(self) -> FleetProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
