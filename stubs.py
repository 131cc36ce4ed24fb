"""The generated gRPC stubs, or one line saying how to make them."""
import sys

# The error a server without a model answers; a client that sees it after a restart sets its coefficients again.
NO_MODEL_ERROR = "no model yet: call SetCoefs first"
STUBS_COMMAND = "python3 -m grpc_tools.protoc -I=. --python_out=. --grpc_python_out=. modelserver.proto"

try:
    import modelserver_pb2 as pb2
    import modelserver_pb2_grpc as pb2_grpc
except ModuleNotFoundError as missing:
    if missing.name not in ("modelserver_pb2", "modelserver_pb2_grpc"):
        raise
    sys.exit(f"error: the generated gRPC stubs are missing; run `make stubs` (or `{STUBS_COMMAND}`)")

__all__ = ["pb2", "pb2_grpc", "NO_MODEL_ERROR", "STUBS_COMMAND"]
