"""The generated gRPC stubs (or one line saying how to make them), and what server and clients agree on."""

import sys
from typing import NoReturn

# The error a server without a model answers; a client that sees it after a restart sets its coefficients again.
NO_MODEL_ERROR = "no model yet: call SetCoefs first"
# Where the server and client.py read the admin token from when no flag gives it.
ADMIN_TOKEN_ENV = "MODELSERVER_ADMIN_TOKEN"
GENERATED_MODULES = ("modelserver_pb2", "modelserver_pb2_grpc", "inference_pb2", "inference_pb2_grpc")
STUBS_COMMAND = "python3 -m grpc_tools.protoc -I=. --python_out=. --grpc_python_out=. modelserver.proto inference.proto"


def exit_if_stubs_are_missing(missing: ModuleNotFoundError) -> NoReturn:
    """Exit with the one line that says how to make the generated stubs, if they are what is missing."""
    if missing.name not in GENERATED_MODULES:
        raise missing
    sys.exit(f"error: the generated gRPC stubs are missing; run `make stubs` (or `{STUBS_COMMAND}`)")


try:
    import modelserver_pb2 as pb2
    import modelserver_pb2_grpc as pb2_grpc
except ModuleNotFoundError as missing:
    exit_if_stubs_are_missing(missing)


def join_address(host: str, port: int) -> str:
    """host:port, with a bare IPv6 host put in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


__all__ = [
    "ADMIN_TOKEN_ENV",
    "NO_MODEL_ERROR",
    "STUBS_COMMAND",
    "exit_if_stubs_are_missing",
    "join_address",
    "pb2",
    "pb2_grpc",
]
