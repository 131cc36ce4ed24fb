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
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from models import (
    DECIMALS,
    LinearModel,
    ModelError,
    ModelFile,
    ModelHandler,
    ModelUnavailableError,
    Row,
    first_line,
    round_row,
)
from stubs import ADMIN_TOKEN_ENV, NO_MODEL_ERROR, join_address, pb2, pb2_grpc

if TYPE_CHECKING:
    import torch

    from inference_server import InferenceServicer
    from metrics import MetricsServer

log = logging.getLogger("modelserver")

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["ModelServer"].full_name
ADMIN_METHODS = frozenset({f"/{SERVICE_NAME}/SetCoefs", f"/{SERVICE_NAME}/ReloadModel"})
TOKEN_NEEDED = "this call needs the admin token: send the metadata 'authorization: Bearer <token>'"
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
MAX_MESSAGE_MB = 2047  # gRPC counts message sizes in a signed 32-bit int
# The cache's keys hold at most this many values in all (about 32 B each as Python floats): 128 MiB at
# worst, whatever the model's width. Rows of up to 419,430 values fit ten at a time; wider ones fewer.
CACHE_VALUES = 1 << 22
# The memo of roundings holds at most this many rows and this many values in all (about 64 B a value
# for the row and its key): 64 MiB at worst, whatever the model's width.
MEMO_ROWS = 4096
MEMO_VALUES = 1 << 20


# --- the cache ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    size: int
    capacity: int
    batched_rows: int  # rows that came in calls of more than one row
    generation: int  # model changes since start
    changed_at: float  # when the model last changed, seconds since the epoch


class PredictionCache:
    """An LRU cache of predictions keyed by the rounded input, emptied whenever the model changes.

    One lock guards the entries, the counters, the model and the memo of roundings. Predictions are
    computed outside the lock; the generation number, bumped by every model change, keeps a result
    computed with an old model out of the cache, so no Predict that starts after SetCoefs returns sees
    old answers. The entries are bounded in number (the LRU's capacity) and in values (CACHE_VALUES).
    The memo maps recent raw rows to their keys, so a repeated row skips the rounding; it keeps only
    rows that were valid for the model served, and is bounded in rows and in values.
    """

    def __init__(self, capacity: int = 10, model: ModelHandler | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[Row, Row | None] = OrderedDict()  # None: an answer being computed
        self._entry_values = 0  # the values of all keys in the cache, bounded by CACHE_VALUES
        self._memo: dict[tuple[float, ...], tuple[float, ...]] = {}
        self._memo_values = 0
        self._model: ModelHandler | None = None
        self._generation = 0
        self._changed_at = time.time()
        self._hits = self._misses = self._evictions = self._batched_rows = 0
        if model is not None:
            self.set_model(model)

    def SetCoefs(self, coefs: torch.Tensor) -> None:
        """Serve y = X @ coefs from now on; coefs is an (n, 1) float32 column."""
        self.set_model(LinearModel(_column_values(coefs)))

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
            self._changed_at = time.time()
            self._entries.clear()
            self._entry_values = 0
            self._forget_rows()
        if old_model is not None:
            old_model.cleanup()

    def Predict(self, X: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """y = model(round(X, 4)) as a fresh (rows, 1) tensor, and whether it came from the cache."""
        import torch

        X, rows = _checked_rows(X)
        one_row = tuple(rows[0]) if len(rows) == 1 else None
        if one_row is None:
            with self._lock:
                self._batched_rows += len(rows)
        remembered = self._memo.get(one_row) if one_row is not None else None
        if remembered is not None:  # a row seen before: its key without a torch op
            y, hit = self._predict_key(remembered)
            return _column((y,)), hit
        rounded = torch.round(X, decimals=DECIMALS)
        key = _flat_values(rounded)
        model, generation, cached = self._lookup(key, width=len(rows[0]), raw_row=one_row)
        if cached is not None:
            return _column(cached), True
        column = model.run_column(rounded)
        self._store(key, generation, _flat_values(column))
        return column, False

    def predict_row(self, row: Sequence[float]) -> tuple[float, bool]:
        """Predict for one row of floats: the server's hot path, equal bit for bit to Predict."""
        values = tuple(row)
        key = self._memo.get(values)
        if key is not None:
            return self._predict_key(key)
        return self._predict_key(tuple(round_row(values)), raw_row=values)

    def _predict_key(self, key: tuple[float, ...], raw_row: tuple[float, ...] | None = None) -> tuple[float, bool]:
        if not key:
            raise ModelError("X is empty: send one value per coefficient")
        model, generation, cached = self._lookup(key, width=len(key), raw_row=raw_row)
        if cached is not None:
            return cached[0], True
        y = model.run_row(key)
        self._store(key, generation, (y,))
        return y, False

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits,
                self._misses,
                self._evictions,
                len(self._entries),
                self._capacity,
                self._batched_rows,
                self._generation,
                self._changed_at,
            )

    def _lookup(
        self, key: tuple[float, ...], width: int, raw_row: tuple[float, ...] | None
    ) -> tuple[ModelHandler, int, tuple[float, ...] | None]:
        """The model, its generation and the cached answer (or None); a valid raw row is remembered."""
        with self._lock:
            model = self._model
            if model is None:
                raise ModelUnavailableError(NO_MODEL_ERROR)
            if width != model.width:
                raise ModelError(model.width_problem(width))
            if raw_row is not None:
                self._remember_row(raw_row, key)
            cached = self._entries.get(key)
            if cached is None:
                self._misses += 1
            else:
                self._entries.move_to_end(key)
                self._hits += 1
            return model, self._generation, cached

    def _remember_row(self, raw_row: tuple[float, ...], key: tuple[float, ...]) -> None:
        if 0.0 in raw_row:
            return  # 0.0 == -0.0: a remembered row could hand back the other zero's sign
        values = len(raw_row)
        if values > MEMO_VALUES:
            return  # wider than the whole budget: not worth forgetting every other row for
        if len(self._memo) >= MEMO_ROWS or self._memo_values + values > MEMO_VALUES:
            self._forget_rows()
        self._memo[raw_row] = key
        self._memo_values += values

    def _forget_rows(self) -> None:
        self._memo = {}  # a new dict: readers outside the lock keep the old one, and just miss
        self._memo_values = 0

    def _store(self, key: tuple[float, ...], generation: int, values: tuple[float, ...]) -> None:
        if any(map(math.isnan, key)):  # the test spelled out, not _has_nan: a call costs the hot path
            return  # a NaN key never equals itself: it could never hit, only evict useful entries
        with self._lock:
            if generation != self._generation:
                return  # the model changed while this was computed
            self._insert(key, values)

    def _insert(self, key: Row, values: Row | None) -> None:
        """Make `key` the most recent entry (None: its answer is being computed) and evict past the bounds."""
        if key not in self._entries:
            self._entry_values += len(key)
        self._entries[key] = values
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity or self._entry_values > CACHE_VALUES:
            evicted, _ = self._entries.popitem(last=False)  # a row wider than the budget evicts itself
            self._entry_values -= len(evicted)
            self._evictions += 1

    @property
    def model(self) -> ModelHandler | None:
        """The model served now (None before the first SetCoefs)."""
        return self._model

    def predict_rows(self, keys: Sequence[Row], expected: ModelHandler) -> tuple[list[Row], int]:
        """Each row's outputs for a batch of rounded rows laid out for the `expected` model's inputs, and
        how many came from the cache. A model swapped in since is used if it takes the same inputs.

        The rows count as if they came one after another: a hit makes its entry the most recent, a miss
        becomes the most recent entry at once (its answer to come) and may evict, and a row repeated in
        the batch is one miss and then hits. Only the misses are computed, in one model call.
        """
        with self._lock:
            model = self._model
            if model is None:
                raise ModelUnavailableError(NO_MODEL_ERROR)
            if model.inputs != expected.inputs or model.outputs != expected.outputs:
                raise ModelUnavailableError("the model changed to one of other inputs while this request was read")
            answers: list[Row | None] = []
            to_compute: dict[Row, None] = {}  # the batch's misses, in order
            hits_before = self._hits
            for key in keys:
                cached = self._entries.get(key)
                if cached is not None or key in to_compute:
                    self._hits += 1
                    if key in self._entries:
                        self._entries.move_to_end(key)
                else:
                    self._misses += 1
                    to_compute[key] = None
                    if not _has_nan(key):
                        self._insert(key, None)
                answers.append(cached)
            if len(keys) > 1:
                self._batched_rows += len(keys)
            hits, generation = self._hits - hits_before, self._generation
        computed = self._compute(model, list(to_compute), generation)
        rows = [answer if answer is not None else computed[key] for answer, key in zip(answers, keys, strict=True)]
        return rows, hits

    def _compute(self, model: ModelHandler, keys: list[Row], generation: int) -> dict[Row, Row]:
        """The model's answers for the batch's misses, kept in the entries that wait for them; if the model
        fails, those entries go."""
        computed: dict[Row, Row] = {}
        try:
            if keys:
                computed = dict(zip(keys, model.run_rows(keys), strict=True))
        finally:
            with self._lock:
                for key in keys:
                    if generation != self._generation or self._entries.get(key, ()) is not None:
                        continue  # the model changed, the entry was evicted, or another call answered it
                    if key in computed:
                        self._entries[key] = computed[key]  # its place in the LRU order stays
                    else:
                        del self._entries[key]
                        self._entry_values -= len(key)
        return computed


def _has_nan(key: Row) -> bool:
    return any(map(math.isnan, key))


@functools.cache
def _float32_template() -> torch.Tensor:
    """An empty float32 tensor: new_full takes its dtype, faster than parsing dtype= on every hit."""
    import torch

    return torch.empty(0, dtype=torch.float32)


def _column(values: tuple[float, ...]) -> torch.Tensor:
    """A new tensor on every call: a caller may change what Predict returns without touching the cache."""
    import torch

    if len(values) == 1:
        return _float32_template().new_full((1, 1), values[0])
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1)


def _flat_values(matrix: torch.Tensor) -> tuple[float, ...]:
    """A 2-D tensor's values row by row, as the cache keys and stores them (one tolist, no flatten op)."""
    return tuple(itertools.chain.from_iterable(matrix.tolist()))


def _column_values(coefs: torch.Tensor) -> list[float]:
    """An (n, 1) or (n,) coefficient tensor's values as float32, or a ModelError that says what is wrong."""
    import torch

    if not isinstance(coefs, torch.Tensor):
        raise ModelError(f"coefs must be a torch.Tensor, not {type(coefs).__name__}")
    if coefs.dim() > 2 or (coefs.dim() == 2 and coefs.shape[1] != 1):
        raise ModelError(f"coefs must be a column vector of shape (n, 1), got shape {tuple(coefs.shape)}")
    return coefs.detach().to(torch.float32).flatten().tolist()


def _checked_rows(X: torch.Tensor) -> tuple[torch.Tensor, list[list[float]]]:
    """X as float32 and its rows as lists of floats, or a ModelError that says what is wrong with it."""
    import torch

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


@dataclass(frozen=True)
class ModelStats:
    name: str  # --model-name, else "linear" or the model file's stem
    kind: str  # "linear", "torch.export" or "TorchScript"
    reloads: int
    reload_failures: int


class ModelServer(pb2_grpc.ModelServerServicer):
    """Translates requests to the cache: repeated floats in, floats and error strings out."""

    def __init__(self, cache: PredictionCache, model_file: ModelFile | None = None, model_name: str = "linear"):
        self._cache = cache
        self._model_file = model_file
        self._model_name = model_name
        self._reload_lock = threading.Lock()
        self._reloads = self._reload_failures = 0

    @_answers_errors(pb2.SetCoefsResponse)
    def SetCoefs(self, request, context):
        self._cache.set_model(self.linear_model(request.coefs))
        return pb2.SetCoefsResponse()

    def linear_model(self, coefs: Sequence[float]) -> LinearModel:
        """The model SetCoefs would serve; ModelError says why there is none (bad coefs, or a model file)."""
        if self._model_file is not None:
            raise ModelError(
                f"this server serves the model file {self._model_file.path}; SetCoefs changes nothing here"
            )
        return LinearModel(coefs)

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
        with self._reload_lock:
            fresh = self.fresh_model_file()
            try:
                self._cache.set_model(fresh)
            except ModelError:
                self._reload_failures += 1
                raise
            self._model_file = fresh
            self._reloads += 1
        log.info("reloaded %s", fresh.path)

    def fresh_model_file(self) -> ModelFile:
        """The served model file, not yet loaded, to read anew; ModelError if the server serves SetCoefs'
        linear model instead."""
        if self._model_file is None:
            raise ModelError("no model file is served (start the server with --model PATH)")
        return ModelFile(self._model_file.path, width=self._model_file.width)  # clients send this width

    def model_stats(self) -> ModelStats:
        """Which model is served and how its reloads went (read without the reload lock: a scrape never waits)."""
        kind = self._model_file.format if self._model_file is not None else "linear"
        return ModelStats(self._model_name, kind, self._reloads, self._reload_failures)


class AdminTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls that change the model unless they carry `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = token.encode()
        self._refusal: grpc.RpcMethodHandler = grpc.unary_unary_rpc_method_handler(self._refuse)

    def intercept_service(self, continuation, handler_call_details):
        metadata = handler_call_details.invocation_metadata or ()
        if handler_call_details.method in ADMIN_METHODS and not carries_token(metadata, self._expected):
            return self._refusal
        return continuation(handler_call_details)

    @staticmethod
    def _refuse(request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, TOKEN_NEEDED)


def carries_token(metadata: Sequence[tuple[str, str | bytes]], expected: bytes) -> bool:
    """Whether the call's metadata has `authorization: Bearer <expected>`. The scheme is matched
    case-insensitively, as HTTP does; the token exactly, in constant time."""
    supplied = str(next((value for key, value in metadata if key == "authorization"), ""))
    scheme, _, token = supplied.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)


@dataclass
class ServerConfig:
    host: str = "[::]"
    port: int = 5440
    workers: int = 4
    cache_size: int = 10
    model: Path | None = None
    model_name: str | None = None
    input_width: int | None = None
    admin_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_mb: float = 4.0
    grace: float = 3.0
    metrics_port: int | None = None

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
    metrics: MetricsServer | None = None

    def stop(self, grace: float) -> None:
        """Refuse new calls, say NOT_SERVING, and let in-flight calls finish within the grace period."""
        stopped = self.server.stop(grace)
        self.health.enter_graceful_shutdown()  # reaches watchers: their streams are in flight
        stopped.wait()
        if self.metrics is not None:
            self.metrics.close()
        self.cache.close()


def start_server(config: ServerConfig) -> RunningServer:
    """Load the model, bind, start and report SERVING; ModelError or OSError says what failed."""
    cache, servicer = build_servicer(config)
    interceptors: list[grpc.ServerInterceptor] = []
    metrics = None
    if config.metrics_port is not None:  # first, so that a port it cannot have leaves the gRPC port unbound
        metrics = _metrics_server(cache, servicer)
        metrics.listen(config.host, config.metrics_port)
        interceptors.append(metrics.interceptor)  # outermost: it sees the token check's refusals too
    if config.admin_token:
        interceptors.append(AdminTokenInterceptor(config.admin_token))
    max_bytes = int(config.max_message_mb * 1024 * 1024)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers),
        options=(
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
        ),
        interceptors=interceptors,
    )
    pb2_grpc.add_ModelServerServicer_to_server(servicer, server)
    inference = inference_servicer(cache, servicer.model_stats())
    inference.add_to_server(server)
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True, experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1)
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (SERVICE_NAME, inference.SERVICE_NAME, health_service, reflection.SERVICE_NAME), server
    )
    try:
        port = _bind(server, config)
    except OSError:
        if metrics is not None:
            metrics.close()
        raise
    server.start()
    for service in ("", SERVICE_NAME, inference.SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, health_servicer, servicer, cache, port, metrics)


def build_servicer(config: ServerConfig) -> tuple[PredictionCache, ModelServer]:
    """The cache with its model, and the ModelServer servicer over it: one server's state, with or without
    a gRPC server of its own (a Ray Serve replica has none)."""
    model_file = ModelFile(config.model, config.input_width) if config.model else None
    cache = PredictionCache(config.cache_size, model=model_file)
    model_name = config.model_name or (config.model.stem if config.model else "linear")
    return cache, ModelServer(cache, model_file, model_name)


def inference_servicer(cache: PredictionCache, model: ModelStats) -> InferenceServicer:
    """The Open Inference Protocol over the same cache, under the model's one name.
    Imported here: inference_server.py builds on this module."""
    from inference_server import InferenceServicer

    platform = {"linear": "linear", "torch.export": "pytorch_export", "TorchScript": "pytorch_libtorch"}[model.kind]
    return InferenceServicer(cache, model.name, platform)


def _metrics_server(cache: PredictionCache, servicer: ModelServer) -> MetricsServer:
    """Imported only when asked for: with metrics off, nothing of them is loaded or paid."""
    from metrics import MetricsServer, ServerCollector

    return MetricsServer(ServerCollector(cache.stats, servicer.model_stats))


def _bind(server: grpc.Server, config: ServerConfig) -> int:
    try:
        if config.tls_cert and config.tls_key:
            port = server.add_secure_port(config.address, _tls_credentials(config.tls_cert, config.tls_key))
        else:
            port = server.add_insecure_port(config.address)
    except RuntimeError:
        port = 0  # gRPC's message only says to set GRPC_VERBOSITY=debug
    if port == 0:
        raise OSError(f"cannot listen on {config.address}: {_why_not_bindable(config.host, config.port)}")
    return port


def _why_not_bindable(host: str, port: int) -> str:
    """The operating system's own reason, found by binding a plain socket the way gRPC binds its own."""
    try:
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host.strip("[]"), port), family=family):
            pass
    except OSError as error:
        return (error.strerror or str(error)).lower()
    return "gRPC could not bind it"


def _tls_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """The server's TLS credentials, or an OSError that names the file and what is wrong with it."""
    chain, private_key = _read_pem(cert, "--tls-cert", b"CERTIFICATE-----"), _read_pem(key, "--tls-key", b"KEY-----")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as error:
        problem = "does not match the certificate" if "MISMATCH" in str(error) else f"cannot be used: {error.reason}"
        raise OSError(f"--tls-key {key} {problem} in --tls-cert {cert}") from None
    return grpc.ssl_server_credentials([(private_key, chain)])


def _read_pem(path: Path, flag: str, label_end: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise OSError(f"cannot read {flag} {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data or label_end not in data:
        kind = "certificate" if flag == "--tls-cert" else "private key"
        raise OSError(f"{flag} {path} is not a PEM {kind} (no '-----BEGIN ...{label_end.decode()}' line)")
    return data


def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the model file. Returns the exit code.

    The signals are blocked in every thread (main() blocks them before any thread starts, and threads
    inherit the mask), so they wait for sigwait here, one at a time: a burst can neither interrupt a
    shutdown under way nor kill the process with a default action.
    """
    try:
        running = start_server(config)
    except (ModelError, OSError) as error:
        log.error("%s", error)
        return 1
    model = config.model or "linear coefficients (set by SetCoefs)"
    log.info(
        "ready: serving on %s (%d workers, cache size %d, model: %s%s, %s%s)",
        join_address(config.host, running.port),
        config.workers,
        config.cache_size,
        model,
        ", TLS" if config.tls_cert else "",
        "SetCoefs and ReloadModel need the admin token" if config.admin_token else "no admin token",
        f", metrics on http://{join_address(config.host, running.metrics.port)}/metrics" if running.metrics else "",
    )
    while (received := signal.sigwait(HANDLED_SIGNALS)) == signal.SIGHUP:
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


def _message_mb(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_MESSAGE_MB:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a size in MiB above 0 and at most {MAX_MESSAGE_MB}, got {text}")
    return value


def _grace(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds from 0 up, got {text}")
    return value


def token_problem(token: str) -> str | None:
    """Why a token cannot serve as the admin token, or None: it must travel in gRPC metadata unchanged."""
    if not token:
        return "is empty (leave it unset to let anyone call SetCoefs)"
    if not all(" " < character <= "~" for character in token):
        return "must be printable ASCII without spaces, as gRPC metadata carries it"
    return None


def _admin_token(text: str) -> str:
    if problem := token_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> ServerConfig:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=defaults.host, help="address to listen on (default %(default)s)")
    parser.add_argument(
        "--port", type=_port, default=defaults.port, help="port, 0 for any free one (default %(default)s)"
    )
    parser.add_argument(
        "--workers", type=_positive_int, default=defaults.workers, help="worker threads (default %(default)s)"
    )
    parser.add_argument(
        "--cache-size", type=_positive_int, default=defaults.cache_size, help="LRU entries (default %(default)s)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="serve this model file (TorchScript, or a torch.export .pt2) instead of SetCoefs' linear model",
    )
    parser.add_argument(
        "--model-name", help="the model's name in the Open Inference Protocol (default: linear, or the file's stem)"
    )
    parser.add_argument("--input-width", type=_positive_int, help="inputs per row, where the model file cannot tell")
    parser.add_argument(
        "--admin-token",
        type=_admin_token,
        help=f"require 'authorization: Bearer TOKEN' for SetCoefs and ReloadModel (or ${ADMIN_TOKEN_ENV})",
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain; serves TLS with --tls-key")
    parser.add_argument("--tls-key", type=Path, help="PEM private key")
    parser.add_argument(
        "--max-message-mb",
        type=_message_mb,
        default=defaults.max_message_mb,
        help="largest request or response in MiB (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (off by default)",
    )
    parser.add_argument(
        "--grace",
        type=_grace,
        default=defaults.grace,
        help="seconds in-flight calls get to finish on shutdown (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("TLS needs both --tls-cert and --tls-key")
    if args.admin_token is None and ADMIN_TOKEN_ENV in os.environ:
        if problem := token_problem(os.environ[ADMIN_TOKEN_ENV]):
            parser.error(f"${ADMIN_TOKEN_ENV} {problem}")
        args.admin_token = os.environ[ADMIN_TOKEN_ENV]
    return ServerConfig(**vars(args))


class OneLineErrors(logging.Filter):
    """gRPC logs a full traceback for every request it cannot parse; one line says as much."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()}: {first_line(record.exc_info[1])}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def main(argv: Sequence[str] | None = None) -> int:
    # First of all, before any thread can start: see serve().
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s modelserver %(levelname)s %(message)s"
    )
    for grpc_logger in ("grpc._common", "grpc._server"):  # where gRPC logs requests it cannot parse
        logging.getLogger(grpc_logger).addFilter(OneLineErrors())
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
