"""A gRPC model server: a PyTorch model behind an exactly-specified, thread-safe LRU prediction cache.

Run `python3 server.py --help` for the flags; README.md explains the cache and its guarantees.
"""
from __future__ import annotations

import argparse
import functools
import hmac
import itertools
import logging
import math
import operator
import os
import signal
import sys
import threading
from array import array
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stubs import ADMIN_TOKEN_ENV, NO_MODEL_ERROR, join_address, pb2, pb2_grpc

log = logging.getLogger("modelserver")

DECIMALS = 4
SCALE = 10.0**DECIMALS
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["ModelServer"].full_name
ADMIN_METHODS = frozenset({f"/{SERVICE_NAME}/SetCoefs", f"/{SERVICE_NAME}/ReloadModel"})


class ModelError(ValueError):
    """A request or a model the server cannot use; the message names the problem and the numbers."""


# --- float32 arithmetic in plain Python --------------------------------------------------------
# The server's hot path avoids torch: every small torch op releases and re-takes the GIL, which
# costs a context switch per op inside a threaded server. These functions reproduce torch's
# float32 results bit for bit (test_prediction_cache.py proves it against torch itself): a double
# holds each intermediate exactly enough that rounding once to float32 gives float32's answer.


def _round_half_even(value: float) -> float:
    """round() to the nearest even integer, keeping the sign of zero and passing inf and NaN through."""
    if not math.isfinite(value):
        return value
    return round(value) or value * 0.0


def round_row(row: Sequence[float]) -> list[float]:
    """Round as torch.round(X, decimals=4) does on float32: x*1e4 in float32, half to even, /1e4."""
    scaled = array("f", [x * SCALE for x in array("f", row)])
    try:
        rounded = [(round(s) or s * 0.0) / SCALE for s in scaled]
    except (OverflowError, ValueError):  # inf or NaN in the row: the slower, general path
        rounded = [_round_half_even(s) / SCALE for s in scaled]
    return array("f", rounded).tolist()


_ROUNDED_KEYS: dict[tuple[float, ...], tuple[float, ...]] = {}  # raw row -> rounded key, a pure function
_ROUNDED_KEYS_LIMIT = 4096


def rounded_key(row: Sequence[float]) -> tuple[float, ...]:
    """round_row as a cache key, remembered for recent rows: repeated inputs are what a cache serves."""
    values = tuple(row)
    key = _ROUNDED_KEYS.get(values)
    if key is None:
        key = tuple(round_row(values))
        _remember_key(values, key)
    return key


def _remember_key(values: tuple[float, ...], key: tuple[float, ...]) -> None:
    if 0.0 in values:
        return  # 0.0 == -0.0: a remembered row could hand back the other zero's sign
    if len(_ROUNDED_KEYS) >= _ROUNDED_KEYS_LIMIT:
        _ROUNDED_KEYS.clear()  # dict operations are atomic: other threads just miss
    _ROUNDED_KEYS[values] = key


def dot_float32(row: Sequence[float], coefs: Sequence[float]) -> float:
    """X @ coefs for one float32 row, summed left to right in float32 as torch does."""
    total = array("f", [0.0])
    for product in array("f", map(operator.mul, row, coefs)):
        total[0] += product
    return total[0]


# --- models -------------------------------------------------------------------------------------


class ModelHandler:
    """What a served model implements; the cache does the rest.

    initialize() loads it, run() maps a (rows, width) float32 tensor to a (rows, 1) float32 column,
    cleanup() releases it. `width` is the number of inputs per row, known once initialized.
    """

    width: int

    def initialize(self) -> None:
        pass

    def run(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_row(self, row: Sequence[float]) -> float:
        """One already-rounded row; a handler with an exact faster path overrides this."""
        return self.run(torch.tensor([list(row)], dtype=torch.float32)).item()

    def cleanup(self) -> None:
        pass


class LinearModel(ModelHandler):
    """y = X @ coefs, the model SetCoefs sets."""

    def __init__(self, coefs: torch.Tensor):
        if not isinstance(coefs, torch.Tensor):
            raise ModelError(f"coefs must be a torch.Tensor, not {type(coefs).__name__}")
        if coefs.dim() > 2 or (coefs.dim() == 2 and coefs.shape[1] != 1):
            raise ModelError(f"coefs must be a column vector of shape (n, 1), got shape {tuple(coefs.shape)}")
        if coefs.numel() == 0:
            raise ModelError("coefs is empty: the model needs at least one coefficient")
        column = coefs.detach().to(torch.float32).reshape(-1, 1).clone()
        finite = torch.isfinite(column).flatten()
        if not bool(finite.all()):
            first_bad = int((~finite).nonzero()[0])
            raise ModelError(
                f"coefs must be finite: {int((~finite).sum())} of {column.shape[0]} are not "
                f"(coefs[{first_bad}] = {column[first_bad, 0].item()})"
            )
        self._coefs = column
        self._coef_values = column.flatten().tolist()
        self.width = column.shape[0]

    def run(self, X: torch.Tensor) -> torch.Tensor:
        return torch.mm(X, self._coefs)

    def run_row(self, row: Sequence[float]) -> float:
        return dot_float32(row, self._coef_values)


class ModelFile(ModelHandler):
    """A model file run on the CPU: a torch.export program (`.pt2`) or TorchScript (anything else)."""

    def __init__(self, path: Path, width: int | None = None):
        self.path = Path(path)
        self.requested_width = width
        self._module: Callable[[torch.Tensor], torch.Tensor] | None = None

    def initialize(self) -> None:
        load = _load_exported_program if self.path.suffix == ".pt2" else _load_torchscript
        try:
            module, own_width = load(self.path)
        except Exception as error:  # any failure to load a user's file is reported, never raised
            raise ModelError(f"cannot load {self.path}: {_first_line(error)}") from None
        width = self.requested_width or own_width
        if width is None:
            raise ModelError(f"cannot tell the input width of {self.path}; pass --input-width")
        self._check_output_shape(module, width)
        self._module, self.width = module, width

    def _check_output_shape(self, module: Callable[[torch.Tensor], torch.Tensor], width: int) -> None:
        probe = torch.zeros(2, width)
        try:
            with torch.inference_mode():
                output = module(probe)
        except Exception as error:  # the model's own code failed on a well-formed input
            raise ModelError(f"{self.path} fails on a (2, {width}) input: {_first_line(error)}") from None
        if not isinstance(output, torch.Tensor) or output.numel() != 2:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ModelError(f"{self.path} returns {shape} for 2 rows; a served model must return one value per row")

    def run(self, X: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            y = self._module(X)
        return one_value_per_row(y, rows=X.shape[0])

    def cleanup(self) -> None:
        self._module = None


def _load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, int | None]:
    """The module, and its width: its own `input_width` attribute, else its first linear layer's in_features."""
    module = torch.jit.load(str(path), map_location="cpu").eval()
    for candidate in (module, *module.modules()):
        for attribute in ("input_width", "in_features"):
            width = getattr(candidate, attribute, None)
            if isinstance(width, int) and width > 0:
                return module, width
    return module, None


def _load_exported_program(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], int | None]:
    """The program's module, and its width: the static second dimension of its input."""
    program = torch.export.load(str(path))
    user_inputs = set(program.graph_signature.user_inputs)
    first_input = next(node for node in program.graph.nodes if node.op == "placeholder" and node.name in user_inputs)
    shape = getattr(first_input.meta.get("val"), "shape", ())
    width = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
    return program.module(), width


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def one_value_per_row(y: torch.Tensor, rows: int) -> torch.Tensor:
    """The model's output as a (rows, 1) float32 column, or a clear error."""
    if not isinstance(y, torch.Tensor) or y.numel() != rows:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ModelError(f"the model returned {shape} for {rows} row(s); it must return one value per row")
    return y.detach().to(torch.float32).reshape(rows, 1)


# --- the cache ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    size: int
    capacity: int


class PredictionCache:
    """An LRU cache of predictions keyed by the rounded input, emptied whenever the model changes.

    One lock guards the entries, the counters and the model. Predictions are computed outside the
    lock; the generation number, bumped by every model change, keeps a result computed with an old
    model out of the cache, so no Predict that starts after SetCoefs returns sees old answers.
    """

    def __init__(self, capacity: int = 10, model: ModelHandler | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[float, ...], tuple[float, ...]] = OrderedDict()
        self._model: ModelHandler | None = None
        self._generation = 0
        self._hits = self._misses = self._evictions = 0
        if model is not None:
            self.set_model(model)

    def SetCoefs(self, coefs: torch.Tensor) -> None:
        """Serve y = X @ coefs from now on; coefs is an (n, 1) float32 column."""
        self.set_model(LinearModel(coefs))

    def set_model(self, model: ModelHandler) -> None:
        """Swap in a model atomically; a model that fails to initialize leaves the old one serving."""
        model.initialize()
        self._swap_model(model)

    def close(self) -> None:
        """Release the model; Predict answers "no model" afterwards."""
        self._swap_model(None)

    def _swap_model(self, model: ModelHandler | None) -> None:
        with self._lock:
            old_model, self._model = self._model, model
            self._generation += 1
            self._entries.clear()
        if old_model is not None:
            old_model.cleanup()

    def Predict(self, X: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """y = model(round(X, 4)) as a fresh (rows, 1) tensor, and whether it came from the cache."""
        X, rows = _checked_rows(X)
        one_row = tuple(rows[0]) if len(rows) == 1 else None
        remembered = _ROUNDED_KEYS.get(one_row)  # only single rows are remembered
        if remembered is not None:  # a row seen before: its key without a torch op
            y, hit = self._predict_key(remembered)
            return _column((y,)), hit
        rounded = torch.round(X, decimals=DECIMALS)
        key = _flat_values(rounded)
        if one_row is not None:
            _remember_key(one_row, key)
        model, generation, cached = self._lookup(key, width=len(rows[0]))
        if cached is not None:
            return _column(cached), True
        y = model.run(rounded)
        self._store(key, generation, _flat_values(y))
        return y, False

    def predict_row(self, row: Sequence[float]) -> tuple[float, bool]:
        """Predict for one row of floats: the server's hot path, equal bit for bit to Predict."""
        return self._predict_key(rounded_key(row))

    def _predict_key(self, key: tuple[float, ...]) -> tuple[float, bool]:
        if not key:
            raise ModelError("X is empty: send one value per coefficient")
        model, generation, cached = self._lookup(key, width=len(key))
        if cached is not None:
            return cached[0], True
        y = model.run_row(key)
        self._store(key, generation, (y,))
        return y, False

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._entries), self._capacity)

    def _lookup(self, key: tuple[float, ...], width: int) -> tuple[ModelHandler, int, tuple[float, ...] | None]:
        with self._lock:
            model = self._model
            if model is None:
                raise ModelError(NO_MODEL_ERROR)
            if width != model.width:
                raise ModelError(f"X has {width} values per row but the model takes {model.width}")
            cached = self._entries.get(key)
            if cached is None:
                self._misses += 1
            else:
                self._entries.move_to_end(key)
                self._hits += 1
            return model, self._generation, cached

    def _store(self, key: tuple[float, ...], generation: int, values: tuple[float, ...]) -> None:
        if any(map(math.isnan, key)):
            return  # a NaN key never equals itself: it could never hit, only evict useful entries
        with self._lock:
            if generation != self._generation:
                return  # the model changed while this was computed
            self._entries[key] = values
            self._entries.move_to_end(key)
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
                self._evictions += 1


_FLOAT32 = torch.empty(0, dtype=torch.float32)  # new_full takes its dtype, faster than parsing dtype=


def _column(values: tuple[float, ...]) -> torch.Tensor:
    """A new tensor on every call: a caller may change what Predict returns without touching the cache."""
    if len(values) == 1:
        return _FLOAT32.new_full((1, 1), values[0])
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)


def _flat_values(matrix: torch.Tensor) -> tuple[float, ...]:
    """A 2-D tensor's values row by row, as the cache keys and stores them (one tolist, no flatten op)."""
    return tuple(itertools.chain.from_iterable(matrix.tolist()))


def _checked_rows(X: torch.Tensor) -> tuple[torch.Tensor, list[list[float]]]:
    """X as float32 and its rows as lists of floats, or a ModelError that says what is wrong with it."""
    if not isinstance(X, torch.Tensor):
        raise ModelError(f"X must be a torch.Tensor, not {type(X).__name__}")
    if X.dim() != 2:
        raise ModelError(f"X must be 2-D (rows, n), got shape {tuple(X.shape)}")
    if X.requires_grad or X.dtype != torch.float32:
        X = X.detach().to(torch.float32)  # answers are values, not part of the caller's autograd graph
    rows = X.tolist()
    if not rows or not rows[0]:
        raise ModelError(f"X is empty (shape {tuple(X.shape)})")
    return X, rows


# --- the gRPC service ---------------------------------------------------------------------------


def _answers_errors(response_type: type) -> Callable:
    """Turn any exception into the response's `error` string: no request may kill a worker."""

    def decorate(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def guarded(self, request, context):
            try:
                return handler(self, request, context)
            except ModelError as error:
                return response_type(error=str(error))
            except Exception:
                log.exception("%s failed", handler.__name__)
                return response_type(error=f"internal error in {handler.__name__}; the server log has the details")

        return guarded

    return decorate


class ModelServer(pb2_grpc.ModelServerServicer):
    """Translates requests to the cache: repeated floats in, floats and error strings out."""

    def __init__(self, cache: PredictionCache, model_file: ModelFile | None = None):
        self._cache = cache
        self._model_file = model_file
        self._reload_lock = threading.Lock()

    @_answers_errors(pb2.SetCoefsResponse)
    def SetCoefs(self, request, context):
        if self._model_file is not None:
            raise ModelError(f"this server serves the model file {self._model_file.path}; SetCoefs changes nothing here")
        self._cache.SetCoefs(torch.tensor(list(request.coefs), dtype=torch.float32).reshape(-1, 1))
        return pb2.SetCoefsResponse()

    @_answers_errors(pb2.PredictResponse)
    def Predict(self, request, context):
        y, hit = self._cache.predict_row(request.X)
        return pb2.PredictResponse(y=y, hit=hit)

    def GetStats(self, request, context):
        stats = self._cache.stats()
        return pb2.GetStatsResponse(
            hits=stats.hits, misses=stats.misses, evictions=stats.evictions, size=stats.size, capacity=stats.capacity
        )

    @_answers_errors(pb2.ReloadModelResponse)
    def ReloadModel(self, request, context):
        self.reload()
        return pb2.ReloadModelResponse()

    def reload(self) -> None:
        """Load the model file anew; on failure the old model keeps serving and ModelError says why."""
        if self._model_file is None:
            raise ModelError("no model file is served (start the server with --model PATH)")
        with self._reload_lock:
            fresh = ModelFile(self._model_file.path, self._model_file.requested_width)
            self._cache.set_model(fresh)
            self._model_file = fresh
        log.info("reloaded %s", fresh.path)


class AdminTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls that change the model unless they carry `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        self._refusal = grpc.unary_unary_rpc_method_handler(self._refuse)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method in ADMIN_METHODS and not self._authorized(handler_call_details):
            return self._refusal
        return continuation(handler_call_details)

    def _authorized(self, handler_call_details) -> bool:
        metadata = handler_call_details.invocation_metadata or ()
        supplied = next((value for key, value in metadata if key == "authorization"), "")
        return hmac.compare_digest(str(supplied).encode(), self._expected)

    @staticmethod
    def _refuse(request, context):
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "this call needs the admin token: send the metadata 'authorization: Bearer <token>'",
        )


@dataclass
class ServerConfig:
    host: str = "[::]"
    port: int = 5440
    workers: int = 4
    cache_size: int = 10
    model: Path | None = None
    input_width: int | None = None
    admin_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_mb: float = 4.0
    grace: float = 3.0

    @property
    def address(self) -> str:
        return join_address(self.host, self.port)


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    servicer: ModelServer
    cache: PredictionCache
    port: int

    def stop(self, grace: float) -> None:
        """Refuse new calls, say NOT_SERVING, and let in-flight calls finish within the grace period."""
        stopped = self.server.stop(grace)
        self.health.enter_graceful_shutdown()  # reaches watchers: their streams are in flight
        stopped.wait()
        self.cache.close()


def start_server(config: ServerConfig) -> RunningServer:
    """Load the model, bind, start and report SERVING; ModelError or OSError says what failed."""
    model_file = ModelFile(config.model, config.input_width) if config.model else None
    cache = PredictionCache(config.cache_size, model=model_file)
    servicer = ModelServer(cache, model_file)
    max_bytes = int(config.max_message_mb * 1024 * 1024)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers),
        options=(
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
        ),
        interceptors=[AdminTokenInterceptor(config.admin_token)] if config.admin_token else None,
    )
    pb2_grpc.add_ModelServerServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True, experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1)
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = _bind(server, config)
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, health_servicer, servicer, cache, port)


def _bind(server: grpc.Server, config: ServerConfig) -> int:
    try:
        if config.tls_cert:
            credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            port = server.add_secure_port(config.address, credentials)
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError as error:
        raise OSError(f"cannot listen on {config.address}: {error}") from None
    if port == 0:
        raise OSError(f"cannot listen on {config.address}: the address is taken or unavailable")
    return port


def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the model file. Returns the exit code."""
    handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    # Blocked before any thread starts, so every thread inherits the mask and sigwait receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    try:
        running = start_server(config)
    except (ModelError, OSError) as error:
        log.error("%s", error)
        return 1
    model = config.model or "linear coefficients (set by SetCoefs)"
    log.info(
        "ready: serving on %s (%d workers, cache size %d, model: %s%s)",
        join_address(config.host, running.port), config.workers, config.cache_size, model,
        ", TLS" if config.tls_cert else "",
    )
    while (received := signal.sigwait(handled)) == signal.SIGHUP:
        try:
            running.servicer.reload()
        except ModelError as error:
            log.error("reload failed, the old model keeps serving: %s", error)
    log.info("%s received: stopping (grace %.1f s)", signal.Signals(received).name, config.grace)
    running.stop(config.grace)
    log.info("stopped")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=_port, default=defaults.port, help="port, 0 for any free one (default %(default)s)")
    parser.add_argument("--workers", type=_positive_int, default=defaults.workers, help="worker threads (default %(default)s)")
    parser.add_argument("--cache-size", type=_positive_int, default=defaults.cache_size, help="LRU entries (default %(default)s)")
    parser.add_argument("--model", type=Path,
                        help="serve this model file (TorchScript, or a torch.export .pt2) instead of SetCoefs' linear model")
    parser.add_argument("--input-width", type=_positive_int, help="inputs per row, where the model file cannot tell")
    parser.add_argument("--admin-token", default=os.environ.get(ADMIN_TOKEN_ENV) or None,
                        help=f"require 'authorization: Bearer TOKEN' for SetCoefs and ReloadModel (or ${ADMIN_TOKEN_ENV})")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain; serves TLS with --tls-key")
    parser.add_argument("--tls-key", type=Path, help="PEM private key")
    parser.add_argument("--max-message-mb", type=float, default=defaults.max_message_mb,
                        help="largest request or response in MiB (default %(default)s)")
    parser.add_argument("--grace", type=float, default=defaults.grace,
                        help="seconds in-flight calls get to finish on shutdown (default %(default)s)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("TLS needs both --tls-cert and --tls-key")
    return ServerConfig(**vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s modelserver %(levelname)s %(message)s")
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
