"""The models the server serves: the linear model SetCoefs sets, and model files (TorchScript, torch.export).

torch is imported only where a model needs it (a model file, the in-process tensor API): the linear model
over gRPC runs in plain Python, and importing torch takes about 1.5 s of a server's start.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import operator
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


# The protocol's datatypes this server carries, and torch's names for them.
TORCH_DTYPES = {"FP32": "float32", "INT64": "int64", "INT32": "int32"}
DECIMALS = 4  # X is rounded to this many decimals before anything, as torch.round(X, decimals=4) rounds float32
SCALE = 10.0**DECIMALS
DESCRIPTION_SUFFIX = ".json"  # classifier.pt2 is described, where it cannot tell, by classifier.json


class ModelError(ValueError):
    """A request or a model the server cannot use; the message names the problem and the numbers."""


class ModelUnavailableError(ModelError):
    """No model is served now, or not the one a request was read for: the same request may work later."""


# The rounding of the cache key, and the linear model's arithmetic, in plain Python. The server's hot path
# avoids torch: every small torch op releases and re-takes the GIL, which costs a context switch per op
# inside a threaded server. Both reproduce torch's float32 results bit for bit (test_prediction_cache.py
# proves it against torch itself).


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


def affinity_key(row: Sequence[float]) -> str:
    """A short name of the row's cache key, its rounded float32 values: rows with one cache entry have one
    name. A router that hashes it (Ray Serve's consistent-hash router, as `session_id`) sends each cache
    key to one replica. -0.0 is named as 0.0, which it equals as a key."""
    rounded = array("f", [value + 0.0 for value in round_row(row)])
    return hashlib.blake2b(rounded.tobytes(), digest_size=8).hexdigest()


def dot_float32(row: Sequence[float], coefs: Sequence[float]) -> float:
    """X @ coefs for one float32 row, summed left to right in float32 as torch does.

    A double holds each product of two float32 values exactly enough that rounding it once to float32
    gives float32's answer; test_prediction_cache.py proves it against torch bit for bit.
    """
    total = array("f", [0.0])
    for product in array("f", map(operator.mul, row, coefs)):
        total[0] += product
    return total[0]


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a model: its protocol datatype and the shape of one row of it."""

    name: str
    datatype: str  # a key of TORCH_DTYPES
    shape: tuple[int, ...]  # without the batch dimension

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {list(self.shape)}"


Row = tuple[float | int, ...]  # one row's values, every tensor flattened and concatenated in order


class ModelHandler:
    """What a served model implements; the cache does the rest.

    initialize() loads it and describes it (`inputs`, `outputs`), run() maps named input tensors, batch
    first, to named output tensors, cleanup() releases it. The cache sees a row as one flat tuple: every
    input's values in `inputs` order, floats rounded; and keeps each row's outputs the same way.
    `width` is the number of values per row through ModelServer's Predict, a single float input with one
    value out per row; None for a model that only the Open Inference Protocol can serve.
    """

    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    width: int | None = None

    def initialize(self) -> None:
        """Load what run() needs and describe the model; raise ModelError if it cannot be served."""

    def run(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def cleanup(self) -> None:
        """Release what initialize() loaded."""

    def describe(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        one_in = len(self.inputs) == 1 and self.inputs[0].datatype == "FP32"
        one_out = sum(spec.size for spec in self.outputs) == 1
        self.width = self.inputs[0].size if one_in and one_out else None

    def width_problem(self, width: int) -> str:
        """Why a Predict of `width` values does not fit this model."""
        if self.width is None:
            inputs = ", ".join(spec.describe() for spec in self.inputs)
            return f"this model takes {inputs} and gives more than one value per row: call ModelInfer"
        return f"X has {width} values per row but the model takes {self.width}"

    def run_rows(self, rows: Sequence[Row]) -> list[Row]:
        """Rows as the cache keys them to rows of outputs as the cache keeps them, in one model call."""
        import torch

        tensors, offset = {}, 0
        for spec in self.inputs:
            values = [row[offset : offset + spec.size] for row in rows]
            dtype = getattr(torch, TORCH_DTYPES[spec.datatype])
            tensors[spec.name] = torch.tensor(values, dtype=dtype).reshape(len(rows), *spec.shape)
            offset += spec.size
        produced = self.run(tensors)
        per_output = [produced[spec.name].reshape(len(rows), -1).tolist() for spec in self.outputs]
        return [tuple(itertools.chain.from_iterable(output[row] for output in per_output)) for row in range(len(rows))]

    def run_row(self, row: Row) -> float:
        """One already-rounded row's one value, for Predict; a handler with an exact faster path overrides this."""
        return float(self.run_rows([row])[0][0])

    def run_column(self, X: torch.Tensor) -> torch.Tensor:
        """A (rows, width) float32 tensor to a (rows, 1) float32 column, for the in-process Predict(X)."""
        produced = self.run({self.inputs[0].name: X})[self.outputs[0].name]
        return one_value_per_row(produced, rows=X.shape[0])


class LinearModel(ModelHandler):
    """y = X @ coefs, the model SetCoefs sets; coefs are float32 values, one per input."""

    def __init__(self, coefs: Sequence[float]):
        values = array("f", coefs).tolist()
        if not values:
            raise ModelError("coefs is empty: the model needs at least one coefficient")
        bad = [index for index, value in enumerate(values) if not math.isfinite(value)]
        if bad:
            raise ModelError(
                f"coefs must be finite: {len(bad)} of {len(values)} are not (coefs[{bad[0]}] = {values[bad[0]]})"
            )
        self._coef_values = values
        self._coef_column: torch.Tensor | None = None
        self.describe([TensorSpec("X", "FP32", (len(values),))], [TensorSpec("y", "FP32", (1,))])

    def run(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": self.run_column(tensors["X"])}

    def run_column(self, X: torch.Tensor) -> torch.Tensor:
        import torch

        if self._coef_column is None:
            self._coef_column = torch.tensor(self._coef_values, dtype=torch.float32).reshape(-1, 1)
        return torch.mm(X, self._coef_column)

    def run_rows(self, rows: Sequence[Row]) -> list[Row]:
        """Each row's sum left to right in float32 from +0.0, as dot_float32 sums one row, but a column at a
        time for the whole batch: a row's answer is the same bit for bit in any batch and alone.

        Like dot_float32 it relies on float32 rounding of double arithmetic: a product of two float32 values
        is exact in a double, and a sum rounded once to float32 is float32's own sum."""
        totals = array("f", bytes(4 * len(rows)))  # +0.0 each
        for column, coef in enumerate(self._coef_values):
            products = array("f", [row[column] * coef for row in rows])
            totals = array("f", map(operator.add, totals, products))
        return [(total,) for total in totals.tolist()]

    def run_row(self, row: Row) -> float:
        return dot_float32(row, self._coef_values)


class ModelFile(ModelHandler):
    """A model file run on the CPU: a torch.export program (`.pt2`) or TorchScript (anything else).

    Its inputs come from the file where it can tell (a torch.export program's signature; a TorchScript
    module's `input_width` or first linear layer, for one flat input), else from a description beside
    it (DESCRIPTION_SUFFIX) or `--input-width`. Its outputs come from running it once on zeros; their
    names from the description, the keys of a dict it returns, `y` for one value per row, or output0, ...
    """

    def __init__(self, path: Path, width: int | None = None):
        self.path = Path(path)
        self.requested_width = width
        self._module: Callable[..., object] | None = None

    @property
    def format(self) -> str:
        """ "torch.export" for a `.pt2` program, else "TorchScript"."""
        return "torch.export" if self.path.suffix == ".pt2" else "TorchScript"

    @property
    def description_path(self) -> Path:
        return self.path.with_suffix(DESCRIPTION_SUFFIX)

    def initialize(self) -> None:
        load = _load_exported_program if self.format == "torch.export" else _load_torchscript
        try:
            module, own_inputs = load(self.path)
        except Exception as error:  # any failure to load a user's file is reported, never raised
            raise ModelError(f"cannot load {self.path}: {first_line(error)}") from None
        declared_inputs, output_names = self._read_description()
        inputs = declared_inputs or self._checked_width(own_inputs)
        outputs = self._probe_outputs(module, inputs, output_names)
        self._module = module
        self.describe(inputs, outputs)

    def _checked_width(self, own_inputs: list[TensorSpec] | None) -> list[TensorSpec]:
        own_width = own_inputs[0].size if own_inputs and len(own_inputs) == 1 else None
        if self.requested_width and own_width and own_width != self.requested_width:
            raise ModelError(
                f"{self.path} takes {own_width} inputs per row, but this server serves {self.requested_width}"
                " (restart it to serve another width)"
            )
        if self.requested_width:
            name = own_inputs[0].name if own_inputs and len(own_inputs) == 1 else "X"
            return [TensorSpec(name, "FP32", (self.requested_width,))]
        if own_inputs:
            return own_inputs
        raise ModelError(
            f"cannot tell the input width of {self.path}; pass --input-width or describe its inputs in "
            f"{self.description_path}"
        )

    def _read_description(self) -> tuple[list[TensorSpec], list[str]]:
        """The inputs and output names a description file beside the model gives, if there is one."""
        if not self.description_path.is_file():
            return [], []
        try:
            described = json.loads(self.description_path.read_text())
            inputs = [
                TensorSpec(str(item["name"]), str(item["datatype"]), tuple(int(d) for d in item["shape"]))
                for item in described["inputs"]
            ]
            names = [str(name) for name in described.get("outputs", [])]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelError(f"cannot read {self.description_path}: {first_line(error)}") from None
        unknown = [spec.datatype for spec in inputs if spec.datatype not in TORCH_DTYPES]
        if unknown or not inputs:
            raise ModelError(
                f"{self.description_path} must describe at least one input of a datatype in "
                f"{', '.join(TORCH_DTYPES)}, got {unknown or 'none'}"
            )
        return inputs, names

    def _probe_outputs(self, module: Callable[..., object], inputs: list[TensorSpec], names: list[str]):
        """Run the model once on two rows of zeros: it must work, and its outputs describe themselves."""
        import torch

        probe = [torch.zeros(2, *spec.shape, dtype=getattr(torch, TORCH_DTYPES[spec.datatype])) for spec in inputs]
        shapes = ", ".join(f"(2, {', '.join(map(str, spec.shape))})" for spec in inputs)
        try:
            with torch.inference_mode():
                produced = _named_outputs(module(*probe), names)
        except Exception as error:  # the model's own code failed on well-formed inputs
            raise ModelError(f"{self.path} fails on inputs of shape {shapes}: {first_line(error)}") from None
        outputs = []
        for name, tensor in produced.items():
            if tensor.dim() == 0 or tensor.shape[0] != 2 or _protocol_datatype(tensor) is None:
                raise ModelError(
                    f"{self.path} returns {name} of shape {tuple(tensor.shape)} and type {tensor.dtype} for 2 rows;"
                    " a served model returns numbers with the batch first"
                )
            outputs.append(TensorSpec(name, str(_protocol_datatype(tensor)), tuple(tensor.shape[1:])))
        if len(outputs) == 1 and outputs[0].size == 1 and not names:
            outputs = [TensorSpec("y", outputs[0].datatype, (1,))]  # one value per row, as Predict answers it
        return outputs

    def run(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        if self._module is None:
            raise ModelError(f"{self.path} is not loaded")
        with torch.inference_mode():
            produced = self._module(*(tensors[spec.name] for spec in self.inputs))
        outputs = _named_outputs(produced, [spec.name for spec in self.outputs])
        rows = next(iter(tensors.values())).shape[0]
        return {spec.name: _as_spec(outputs[spec.name], spec, rows) for spec in self.outputs}

    def cleanup(self) -> None:
        self._module = None


def _as_spec(tensor: torch.Tensor, spec: TensorSpec, rows: int) -> torch.Tensor:
    import torch

    return tensor.detach().to(getattr(torch, TORCH_DTYPES[spec.datatype])).reshape(rows, *spec.shape)


def _named_outputs(produced: object, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """A model's outputs by name: a dict's keys, else the names given, else output0, output1, ..."""
    import torch

    if isinstance(produced, dict):
        keys, values = [str(key) for key in produced], list(produced.values())
    else:
        keys, values = [], list(produced) if isinstance(produced, (tuple, list)) else [produced]
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    if len(tensors) != len(values):
        raise ModelError(f"the model returned {type(produced).__name__} holding more than tensors")
    if keys:
        return dict(zip(keys, tensors, strict=True))
    if names and len(names) != len(tensors):
        raise ModelError(f"the model returned {len(tensors)} outputs, but {len(names)} names describe them")
    if len(tensors) == 1 and not names:
        return {"y": tensors[0]}
    return dict(zip(names or [f"output{index}" for index in range(len(tensors))], tensors, strict=True))


def _protocol_datatype(tensor: torch.Tensor) -> str | None:
    """The protocol's name for a tensor's type (floats are served as FP32), or None for one it cannot carry."""
    if tensor.dtype.is_floating_point:
        return "FP32"
    return next((name for name, dtype in TORCH_DTYPES.items() if str(tensor.dtype) == f"torch.{dtype}"), None)


def _load_torchscript(path: Path) -> tuple[Callable[..., object], list[TensorSpec] | None]:
    """The module, and its one flat input if it tells its width: an `input_width` attribute, or its first
    linear layer's in_features."""
    import torch

    module = torch.jit.load(str(path), map_location="cpu").eval()
    for candidate in (module, *module.modules()):
        for attribute in ("input_width", "in_features"):
            width = getattr(candidate, attribute, None)
            if isinstance(width, int) and width > 0:
                return module, [TensorSpec("X", "FP32", (width,))]
    return module, None


def _load_exported_program(path: Path) -> tuple[Callable[..., object], list[TensorSpec] | None]:
    """The program's module, and its inputs as its signature declares them (the first dimension is the batch)."""
    import torch

    program = torch.export.load(str(path))
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    inputs = []
    for name in user_inputs:
        value = placeholders[name].meta.get("val")
        shape = tuple(getattr(value, "shape", ()))[1:]
        datatype = _protocol_datatype(value) if isinstance(value, torch.Tensor) else None
        if datatype is None or not all(isinstance(dim, int) for dim in shape):
            return program.module(), None  # a signature the protocol cannot describe: ask for a description
        inputs.append(TensorSpec(name, datatype, shape))
    return program.module(), inputs


def first_line(error: BaseException) -> str:
    """An exception as one line of text, for a log line or an error answer."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def one_value_per_row(y: torch.Tensor, rows: int) -> torch.Tensor:
    """The model's output as a (rows, 1) float32 column, or a clear error."""
    import torch

    if not isinstance(y, torch.Tensor) or y.numel() != rows:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ModelError(f"the model returned {shape} for {rows} row(s); it must return one value per row")
    return y.detach().to(torch.float32).reshape(rows, 1)
