"""Prometheus metrics for the server, on their own HTTP port (`--metrics-port`), made by prometheus-client.

Two sources, so that nothing is counted twice:
- the cache and the model report what they already count (the same counters GetStats reads), through a
  collector that reads them when Prometheus scrapes: nothing is paid on the request path for them;
- requests by RPC and outcome, their latency and those in flight are counted by a gRPC interceptor, the
  one cost a request pays, and only when metrics are on.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

PREFIX = "modelserver"
# From 100 µs (a cached answer on an idle server) to 10 s (a slow model under load), about 2.5x apart.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BUCKET_LABELS = (*map(floatToGoString, LATENCY_BUCKETS), "+Inf")  # as Prometheus writes `le`
MAX_WRAPPED_HANDLERS = 256
UNMEASURED_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ServerCollector(Collector):
    """The cache's and the model's own counters as metrics, read when Prometheus scrapes."""

    def __init__(self, cache_stats: Callable[[], Any], model_stats: Callable[[], Any]):
        self._cache_stats = cache_stats
        self._model_stats = model_stats

    def collect(self) -> Iterator[Metric]:
        cache, model = self._cache_stats(), self._model_stats()
        yield CounterMetricFamily(f"{PREFIX}_cache_hits", "Rows answered from the cache.", value=cache.hits)
        yield CounterMetricFamily(f"{PREFIX}_cache_misses", "Rows computed by the model.", value=cache.misses)
        yield CounterMetricFamily(
            f"{PREFIX}_cache_evictions", "Entries evicted as least recently used.", value=cache.evictions
        )
        yield GaugeMetricFamily(f"{PREFIX}_cache_entries", "Entries in the cache now.", value=cache.size)
        yield GaugeMetricFamily(f"{PREFIX}_cache_capacity", "Entries the cache holds at most.", value=cache.capacity)
        yield CounterMetricFamily(
            f"{PREFIX}_cache_batched_rows", "Rows that came in calls of more than one row.", value=cache.batched_rows
        )
        yield InfoMetricFamily(f"{PREFIX}_model", "The model served.", value={"name": model.name, "kind": model.kind})
        yield GaugeMetricFamily(
            f"{PREFIX}_model_generation", "Model changes since start (SetCoefs, reloads).", value=cache.generation
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_model_last_change_timestamp_seconds",
            "When the model last changed, in seconds since the epoch.",
            value=cache.changed_at,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_model_reloads", "Model file reloads that took effect.", value=model.reloads
        )
        yield CounterMetricFamily(
            f"{PREFIX}_model_reload_failures", "Model file reloads refused; the old model kept serving.",
            value=model.reload_failures,
        )  # fmt: skip


@dataclass
class RpcTally:
    """One RPC's calls: by outcome, and their durations by latency bucket (the last is +Inf)."""

    outcomes: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    seconds: float = 0.0


class RequestMetrics(grpc.ServerInterceptor, Collector):
    """Counts every call by RPC and outcome, times it, and tracks those in flight (health and reflection aside).

    The outcome is `ok`, `error` (an answer whose `error` field says what was wrong), or the gRPC status
    code the call ended with. Each method's handler is wrapped once and reused. The tallies are plain
    numbers under one lock, taken twice a call, and become metric families when Prometheus scrapes:
    prometheus-client's own Counter, Gauge and Histogram take a lock per update, and cost a unary
    Predict 8-9 % more instructions here, against 3-4 % this way (BENCHMARKS.md).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._tallies: dict[str, RpcTally] = {}
        self._wrapped: dict[tuple[str, int], tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNMEASURED_SERVICES):
            return handler
        key = (method, id(handler))  # a method may have two handlers: the real one and the token check's refusal
        known = self._wrapped.get(key)
        if known is not None and known[0] is handler:
            return known[1]
        if len(self._wrapped) >= MAX_WRAPPED_HANDLERS:
            self._wrapped.clear()  # handlers are long-lived in practice; this only bounds a surprise
        wrapped = self._wrap(method.rsplit("/", 1)[-1], handler)
        self._wrapped[key] = (handler, wrapped)
        return wrapped

    def _wrap(self, rpc: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary
        if behavior is None:
            return handler  # streams (health's Watch) are not measured
        with self._lock:
            tally = self._tallies.setdefault(rpc, RpcTally())

        def measured(request, context):
            started = time.perf_counter()
            with self._lock:
                self._in_flight += 1
            try:
                response = behavior(request, context)
            except BaseException:
                self._finish(tally, _status_name(context), time.perf_counter() - started)
                raise
            self._finish(tally, "error" if getattr(response, "error", "") else "ok", time.perf_counter() - started)
            return response

        return grpc.unary_unary_rpc_method_handler(
            measured,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _finish(self, tally: RpcTally, outcome: str, seconds: float) -> None:
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)  # the first bound >= seconds: Prometheus' `le`
        with self._lock:
            self._in_flight -= 1
            tally.outcomes[outcome] = tally.outcomes.get(outcome, 0) + 1
            tally.buckets[bucket] += 1
            tally.seconds += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(f"{PREFIX}_requests", "Requests by RPC and outcome.", labels=["rpc", "outcome"])
        latency = HistogramMetricFamily(f"{PREFIX}_request_duration_seconds", "Time to answer, by RPC.", labels=["rpc"])
        with self._lock:
            in_flight = self._in_flight
            tallies = {rpc: (dict(t.outcomes), list(t.buckets), t.seconds) for rpc, t in self._tallies.items()}
        for rpc, (outcomes, buckets, seconds) in tallies.items():
            for outcome, count in outcomes.items():
                requests.add_metric([rpc, outcome], count)
            latency.add_metric([rpc], list(zip(BUCKET_LABELS, itertools.accumulate(buckets), strict=True)), seconds)
        yield requests
        yield latency
        yield GaugeMetricFamily(f"{PREFIX}_requests_in_flight", "Requests being answered now.", value=in_flight)


def _status_name(context: grpc.ServicerContext) -> str:
    # Set by context.abort, None for an exception gRPC turns into UNKNOWN; grpcio has code(), its stubs do not.
    code = context.code()  # type: ignore[attr-defined]
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN.name


class MetricsServer:
    """The /metrics endpoint: the request metrics, the server's own counters and the process' metrics."""

    def __init__(self, collector: ServerCollector):
        disable_created_metrics()  # the *_created series would double every counter for no dashboard's use
        self.registry = CollectorRegistry()
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=self.registry)
        self.registry.register(collector)
        self.interceptor = RequestMetrics()
        self.registry.register(self.interceptor)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def listen(self, host: str, port: int) -> int:
        """Serve Prometheus' text format on http://host:port/metrics; OSError if the port cannot be had."""
        if not 1 <= port <= 65535:
            raise OSError(f"--metrics-port must be from 1 to 65535, got {port}")
        try:
            self._http, self._thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve metrics on port {port}: {(error.strerror or str(error)).lower()}") from None
        self.port = self._http.server_port
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
