"""Docker HEALTHCHECK probe: exit 0 when the container's server answers SERVING on grpc.health.v1.

It reads the server's own command line from /proc and parses it with server.py's own flags, so the probe
follows the address, port and TLS the server was started with (`docker run p3 --port 6000`, `--tls-cert`).
With TLS it trusts the server's certificate and dials it as `localhost`, the name a probe in the container uses.
"""

import sys
from pathlib import Path

import grpc

from server import parse_args
from serverproc import wait_until_serving
from stubs import join_address

ANY_ADDRESS = {"[::]", "::", "0.0.0.0", ""}  # what the server may bind; the probe dials loopback instead


def server_flags() -> list[str] | None:
    """The flags of the server.py process running in this container, or None if there is none."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue  # the process ended while we looked
        for position, argument in enumerate(argv[:3]):
            if Path(argument).name == "server.py":
                return argv[position + 1 :]
    return None


def open_probe_channel(flags: list[str]) -> grpc.Channel:
    config = parse_args(flags)
    host = "127.0.0.1" if config.host in ANY_ADDRESS else config.host
    address = join_address(host, config.port)
    if config.tls_cert is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(root_certificates=config.tls_cert.read_bytes())
    return grpc.secure_channel(address, credentials, options=(("grpc.ssl_target_name_override", "localhost"),))


def main() -> int:
    flags = server_flags()
    if flags is None:
        print("unhealthy: no server.py process runs in this container", file=sys.stderr)
        return 1
    try:
        with open_probe_channel(flags) as channel:
            wait_until_serving(channel, timeout=3)
    except (TimeoutError, grpc.RpcError, OSError) as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
