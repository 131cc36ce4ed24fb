"""Docker HEALTHCHECK probe: exit 0 when the local server's grpc.health.v1 service answers SERVING.

python3 healthcheck.py [PORT]        (default 5440; cheap: no torch import)
"""

import sys

import grpc

from serverproc import wait_until_serving


def main(argv: list[str]) -> int:
    port = argv[1] if len(argv) > 1 else "5440"
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_until_serving(channel, timeout=3)
    except (TimeoutError, grpc.RpcError) as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
