"""The Open Inference Protocol (KServe's V2 protocol, as Triton speaks it) over the same cache and models.

Every RPC converts the request, calls the cache or the model, and converts the answer. A ModelInfer of B
rows is cached row by row with ModelServer's rules (its `PredictionCache.predict_rows`): a row's floats
are rounded exactly as Predict rounds them, so the linear model's row shares one cache entry, and one
answer bit for bit, across both APIs and any batch. Bad requests get the status a Triton user expects:
NOT_FOUND for an unknown model or version, INVALID_ARGUMENT naming the problem and the numbers.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import sys
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from models import ModelError, ModelHandler, ModelUnavailableError, Row, TensorSpec, round_row
from stubs import exit_if_stubs_are_missing

try:
    import inference_pb2 as oip
    import inference_pb2_grpc as oip_grpc
except ModuleNotFoundError as missing:
    exit_if_stubs_are_missing(missing)

if TYPE_CHECKING:
    from server import PredictionCache

log = logging.getLogger("modelserver")

SERVER_NAME = "modelserver"
SERVER_VERSION = "0.4.0"
MODEL_VERSION = "1"  # one version per model: a reload replaces it
MAX_BATCH_SIZE = 4096  # rows per ModelInfer; what a normal batch needs, and bounded work under the cache's lock
# The protocol's datatypes this server carries: the array typecode of one value, and the typed contents field.
ENCODINGS = {"FP32": ("f", "fp32_contents"), "INT64": ("q", "int64_contents"), "INT32": ("i", "int_contents")}
PROTOCOL_DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
                      "FP32", "FP64", "BYTES", "BF16")  # fmt: skip


class InferenceError(Exception):
    """A request the protocol refuses, with the status code a Triton user expects."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _aborts_errors(handler: Callable) -> Callable:
    """An InferenceError becomes its status; a failing model INTERNAL with its message; nothing kills a worker."""

    @functools.wraps(handler)
    def guarded(self, request, context):
        try:
            return handler(self, request, context)
        except InferenceError as error:
            context.abort(error.code, str(error))
        except ModelError as error:
            context.abort(grpc.StatusCode.INTERNAL, str(error))
        except Exception:
            log.exception("%s failed", handler.__name__)
            context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {handler.__name__}; the server log has the details"
            )

    return guarded


@dataclass
class InferenceTally:
    """What ModelStatistics reports, counted under one lock."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    rows: int = 0
    executions: int = 0
    hit_rows: int = 0
    miss_rows: int = 0
    last_inference_ms: int = 0


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService for the one model the server serves, under its name."""

    SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

    def __init__(self, cache: PredictionCache, model_name: str, platform: str):
        self._cache = cache
        self._model_name = model_name
        self._platform = platform
        self._lock = threading.Lock()
        self._tally = InferenceTally()

    def add_to_server(self, server: grpc.Server) -> None:
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(self, server)

    def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=True)  # serving; whether a model is loaded is ModelReady's

    @_aborts_errors
    def ModelReady(self, request, context):
        self._check_name(request.name, request.version)
        return oip.ModelReadyResponse(ready=self._cache.model is not None)

    def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=["model_configuration", "statistics"]
        )

    @_aborts_errors
    def ModelMetadata(self, request, context):
        model = self._model(request.name, request.version)
        return oip.ModelMetadataResponse(
            name=self._model_name,
            versions=[MODEL_VERSION],
            platform=self._platform,
            inputs=[_tensor_metadata(spec) for spec in model.inputs],
            outputs=[_tensor_metadata(spec) for spec in model.outputs],
        )

    @_aborts_errors
    def ModelConfig(self, request, context):
        model = self._model(request.name, request.version)
        config = oip.ModelConfig(
            name=self._model_name,
            platform=self._platform,
            backend="pytorch",
            max_batch_size=MAX_BATCH_SIZE,
            input=[oip.ModelInput(name=s.name, data_type=_config_type(s), dims=s.shape) for s in model.inputs],
            output=[oip.ModelOutput(name=s.name, data_type=_config_type(s), dims=s.shape) for s in model.outputs],
        )
        return oip.ModelConfigResponse(config=config)

    @_aborts_errors
    def ModelStatistics(self, request, context):
        if request.name:
            self._check_name(request.name, request.version)
        with self._lock:
            tally = InferenceTally(**vars(self._tally))
        duration = oip.StatisticDuration
        stats = oip.ModelStatistics(
            name=self._model_name,
            version=MODEL_VERSION,
            last_inference=tally.last_inference_ms,
            inference_count=tally.rows,
            execution_count=tally.executions,
            inference_stats=oip.InferStatistics(
                success=duration(count=tally.success_count, ns=tally.success_ns),
                fail=duration(count=tally.fail_count, ns=tally.fail_ns),
                cache_hit=duration(count=tally.hit_rows),
                cache_miss=duration(count=tally.miss_rows),
            ),
        )
        return oip.ModelStatisticsResponse(model_stats=[stats])

    @_aborts_errors
    def ModelInfer(self, request, context):
        started = time.perf_counter_ns()
        try:
            response, rows, hits = self._infer(request)
        except BaseException:
            self._count_failure(started)
            raise
        self._count_success(started, rows, hits)
        return response

    def _infer(self, request) -> tuple[object, int, int]:
        model = self._model(request.model_name, request.model_version)
        keys = decode_rows(request, model)
        outputs = requested_outputs(request, model)
        try:
            rows, hits = self._cache.predict_rows(keys, model)
        except ModelUnavailableError as error:
            raise InferenceError(grpc.StatusCode.UNAVAILABLE, str(error)) from None
        response = oip.ModelInferResponse(model_name=self._model_name, model_version=MODEL_VERSION, id=request.id)
        response.parameters["cached_rows"].int64_param = hits
        for spec, offset in outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=[len(rows), *spec.shape])
            response.raw_output_contents.append(encode(spec, [row[offset : offset + spec.size] for row in rows]))
        return response, len(rows), hits

    def _count_success(self, started_ns: int, rows: int, hits: int) -> None:
        elapsed = time.perf_counter_ns() - started_ns
        with self._lock:
            self._tally.success_count += 1
            self._tally.success_ns += elapsed
            self._tally.rows += rows
            self._tally.hit_rows += hits
            self._tally.miss_rows += rows - hits
            self._tally.executions += hits < rows  # the misses are computed in one model call
            self._tally.last_inference_ms = time.time_ns() // 1_000_000

    def _count_failure(self, started_ns: int) -> None:
        elapsed = time.perf_counter_ns() - started_ns
        with self._lock:
            self._tally.fail_count += 1
            self._tally.fail_ns += elapsed

    def _check_name(self, name: str, version: str) -> None:
        if name != self._model_name:
            raise InferenceError(
                grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}: this server serves {self._model_name!r}"
            )
        if version not in ("", MODEL_VERSION):
            raise InferenceError(
                grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {version!r}; it has {MODEL_VERSION!r}"
            )

    def _model(self, name: str, version: str) -> ModelHandler:
        self._check_name(name, version)
        model = self._cache.model
        if model is None:
            raise InferenceError(grpc.StatusCode.UNAVAILABLE, f"model {name!r} is not ready: call SetCoefs first")
        return model


def _tensor_metadata(spec: TensorSpec):
    return oip.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=[-1, *spec.shape])


def _config_type(spec: TensorSpec) -> int:
    return oip.DataType.Value(f"TYPE_{spec.datatype}")


def invalid(message: str) -> InferenceError:
    return InferenceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def decode_rows(request, model: ModelHandler) -> list[Row]:
    """The request's rows as the cache keys them: every input's values of a row, in the model's input order,
    floats rounded as Predict rounds them, integers as they are."""
    by_name = _checked_input_names(request, model)
    raw = list(request.raw_input_contents)
    if raw and any(tensor.HasField("contents") for tensor in request.inputs):
        raise invalid("the request mixes raw_input_contents and typed contents; send one or the other")
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    batch_sizes = {tensor.shape[0] if tensor.shape else 0 for tensor in request.inputs}
    columns = []
    for spec in model.inputs:
        position, tensor = by_name[spec.name]
        values = _input_values(tensor, spec, raw[position] if raw else None)
        columns.append(list(zip(*[iter(values)] * spec.size, strict=True)))  # consecutive values, a row each
    if len(batch_sizes) != 1:
        raise invalid(f"the inputs' first dimensions differ ({sorted(batch_sizes)}); it is the batch, the same for all")
    if len(columns) == 1:
        return columns[0]
    return [tuple(itertools.chain.from_iterable(parts)) for parts in zip(*columns, strict=True)]


def _checked_input_names(request, model: ModelHandler) -> dict[str, tuple[int, Any]]:
    """Each input tensor by name, with its position: every one the model takes, once, and no other."""
    expected = ", ".join(spec.describe() for spec in model.inputs)
    by_name: dict[str, tuple[int, Any]] = {}
    for position, tensor in enumerate(request.inputs):
        if tensor.name in by_name:
            raise invalid(f"input {tensor.name!r} is sent twice")
        if tensor.name not in {spec.name for spec in model.inputs}:
            raise invalid(f"unknown input {tensor.name!r}: the model takes {expected}")
        by_name[tensor.name] = (position, tensor)
    missing = [spec.name for spec in model.inputs if spec.name not in by_name]
    if missing:
        raise invalid(f"missing input {missing[0]!r}: the model takes {expected}")
    return by_name


def _input_values(tensor, spec: TensorSpec, raw: bytes | None) -> list[float] | list[int]:
    """One input's values, flat and row-major, checked against the model's description of it."""
    if tensor.datatype not in ENCODINGS:
        known = "a datatype of the protocol" if tensor.datatype in PROTOCOL_DATATYPES else "not a protocol datatype"
        raise invalid(f"input {spec.name!r} is {tensor.datatype} ({known}); this server takes FP32, INT64 and INT32")
    if tensor.datatype != spec.datatype:
        raise invalid(f"input {spec.name!r} is {tensor.datatype}, but the model takes {spec.datatype}")
    shape = list(tensor.shape)
    if len(shape) != len(spec.shape) + 1 or tuple(shape[1:]) != spec.shape or shape[0] < 1:
        raise invalid(f"input {spec.name!r} has shape {shape}, but the model takes {[-1, *spec.shape]} (rows first)")
    if shape[0] > MAX_BATCH_SIZE:
        raise invalid(f"input {spec.name!r} has {shape[0]} rows; a request may carry at most {MAX_BATCH_SIZE}")
    count = math.prod(shape)
    typecode, field = ENCODINGS[spec.datatype]
    if raw is None:
        values = list(getattr(tensor.contents, field))
        if len(values) != count:
            raise invalid(f"input {spec.name!r} has {len(values)} values in {field} for shape {shape} ({count})")
    else:
        decoded = array(typecode)
        if len(raw) != count * decoded.itemsize:
            raise invalid(
                f"input {spec.name!r} has {len(raw)} bytes of raw contents, but shape {shape} of {spec.datatype} "
                f"takes {count * decoded.itemsize}"
            )
        decoded.frombytes(raw)
        if sys.byteorder != "little":
            decoded.byteswap()  # the protocol's raw contents are little-endian
        values = decoded.tolist()
    return round_row(values) if spec.datatype == "FP32" else values


def requested_outputs(request, model: ModelHandler) -> list[tuple[TensorSpec, int]]:
    """The outputs to send, each with where its values start in a row's outputs: those asked for, or all."""
    offsets, offset = {}, 0
    for spec in model.outputs:
        offsets[spec.name] = (spec, offset)
        offset += spec.size
    if not request.outputs:
        return list(offsets.values())
    unknown = [output.name for output in request.outputs if output.name not in offsets]
    if unknown:
        raise invalid(f"unknown output {unknown[0]!r}: the model gives {', '.join(offsets)}")
    return [offsets[output.name] for output in request.outputs]


def encode(spec: TensorSpec, rows: Sequence[Row]) -> bytes:
    """Rows of one output as the protocol's raw contents: little-endian, row-major."""
    encoded = array(ENCODINGS[spec.datatype][0], itertools.chain.from_iterable(rows))
    if sys.byteorder != "little":
        encoded.byteswap()
    return encoded.tobytes()
