"""Start the model server's Ray Serve fleet on this machine, or stop it (make serve-ray, make stop-ray).

    python3 deploy/ray/fleet.py up [--replicas N] [--grpc-port PORT]   start Ray, deploy, wait for every replica
    python3 deploy/ray/fleet.py down                                   stop Serve and every Ray process here

`up` returns once every replica is ready and prints where the gRPC proxy listens. Ray keeps to loopback:
its local-only mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) announces and dials 127.0.0.1 instead of the
host's network address. README.md says how to run the fleet across machines instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[2]
CONFIG = PROJECT / "deploy" / "ray" / "serve.yaml"
LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # read when Ray is imported: set before that
START_TIMEOUT = 180.0  # seconds for every replica to come up on a busy machine


def ray_environment() -> dict[str, str]:
    """The environment of every Ray process: loopback only, and the project's modules importable by the
    proxy (the stubs) and the replicas (ray_app and what it imports)."""
    path = os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **LOCAL_ONLY, "PYTHONPATH": path}


def start_ray(gcs_port: int, cpus: int, temp_dir: Path | None) -> None:
    """A one-machine Ray head on 127.0.0.1; exits with Ray's own last line if it cannot start."""
    from serverproc import free_port

    command = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        f"--num-cpus={cpus}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    if temp_dir is not None:
        command.append(f"--temp-dir={temp_dir}")
    started = subprocess.run(command, env=ray_environment(), capture_output=True, text=True, check=False)
    if started.returncode != 0:
        lines = (started.stderr or started.stdout).strip().splitlines() or ["no output"]
        sys.exit(f"error: Ray did not start (exit {started.returncode}): {lines[-1]}")


def serve_config(args: argparse.Namespace) -> dict[str, Any]:
    """deploy/ray/serve.yaml with this run's replicas, ports and model file."""
    import yaml

    from ray_app import REPLICA_DEPLOYMENT

    config = yaml.safe_load(CONFIG.read_text())
    config["grpc_options"]["port"] = args.grpc_port
    config["http_options"]["port"] = args.http_port
    for application in config["applications"]:
        if args.model is not None:
            application["args"]["model"] = str(args.model.resolve())
        for deployment in application["deployments"]:
            if deployment["name"] == REPLICA_DEPLOYMENT:
                deployment["num_replicas"] = args.replicas
    return config


def deploy(gcs_port: int, config: dict[str, Any]) -> None:
    """Start Serve with the config's proxies, apply its applications, and wait until all are RUNNING."""
    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from ray_app import FleetError, controller_client, wait_until_running

    ray.init(address=f"127.0.0.1:{gcs_port}", logging_level=logging.WARNING, log_to_driver=False)
    serve.start(
        proxy_location=config["proxy_location"],
        http_options=config["http_options"],
        grpc_options=config["grpc_options"],
    )
    controller_client().deploy_apps(ServeDeploySchema.model_validate({"applications": config["applications"]}))
    try:
        for application in config["applications"]:
            wait_until_running(application["name"], START_TIMEOUT)
    except FleetError as error:
        stop_ray()
        sys.exit(f"error: {error}; Ray is stopped again")


def stop_ray() -> None:
    """`ray stop`: every Ray process of this machine's user, Serve's detached ones included."""
    subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "stop"], env=ray_environment(), capture_output=True, check=True
    )


def up(args: argparse.Namespace) -> None:
    config = serve_config(args)
    start_ray(args.gcs_port, max(os.cpu_count() or 1, args.replicas), args.temp_dir)
    deploy(args.gcs_port, config)
    print(
        f"serving: Ray Serve's gRPC proxy listens on port {args.grpc_port} (127.0.0.1:{args.grpc_port} from here), "
        f"{args.replicas} replicas ready; health: grpc.health.v1 there, "
        f"or http://127.0.0.1:{args.http_port}/-/healthz; stop it with make stop-ray",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start a local Ray, deploy, wait until every replica is ready")
    start.add_argument("--replicas", type=int, default=2, help="replicas of the server (default %(default)s)")
    start.add_argument("--grpc-port", type=int, default=9000, help="the gRPC proxy's port (default %(default)s)")
    start.add_argument("--http-port", type=int, default=8000, help="Ray's HTTP proxy's port (default %(default)s)")
    start.add_argument("--gcs-port", type=int, default=6379, help="Ray's own head port (default %(default)s)")
    start.add_argument("--temp-dir", type=Path, help="Ray's session folder (default Ray's, /tmp/ray)")
    start.add_argument("--model", type=Path, help="serve this model file instead of SetCoefs' linear model")
    commands.add_parser("down", help="stop Serve and every Ray process of this machine's user")
    args = parser.parse_args(argv)
    if args.command == "up" and args.replicas < 1:
        parser.error(f"--replicas must be at least 1, got {args.replicas}")
    if args.command == "up" and args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if find_spec("ray") is None:
        sys.exit("error: Ray Serve is not installed in this Python: make setup-ray (requirements-ray.txt)")
    os.environ.update(LOCAL_ONLY)
    sys.path.insert(0, str(PROJECT))
    if args.command == "up":
        up(args)
    else:
        stop_ray()
        print("stopped: Serve and Ray")
    return 0


if __name__ == "__main__":
    sys.exit(main())
