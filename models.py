"""The models the server serves: the linear model SetCoefs sets, and model files (TorchScript, torch.export).

torch is imported only where a model needs it (a model file, the in-process tensor API): the linear model
over gRPC runs in plain Python, and importing torch takes about 1.5 s of a server's start.
"""

from __future__ import annotations

import math
import operator
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ModelError(ValueError):
    """A request or a model the server cannot use; the message names the problem and the numbers."""


def dot_float32(row: Sequence[float], coefs: Sequence[float]) -> float:
    """X @ coefs for one float32 row, summed left to right in float32 as torch does.

    A double holds each product of two float32 values exactly enough that rounding it once to float32
    gives float32's answer; test_prediction_cache.py proves it against torch bit for bit.
    """
    total = array("f", [0.0])
    for product in array("f", map(operator.mul, row, coefs)):
        total[0] += product
    return total[0]


class ModelHandler:
    """What a served model implements; the cache does the rest.

    initialize() loads it, run() maps a (rows, width) float32 tensor to a (rows, 1) float32 column,
    cleanup() releases it. `width` is the number of inputs per row, known once initialized.
    """

    width: int

    def initialize(self) -> None:
        """Load what run() needs; raise ModelError if the model cannot be served."""

    def run(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_row(self, row: Sequence[float]) -> float:
        """One already-rounded row; a handler with an exact faster path overrides this."""
        import torch

        return self.run(torch.tensor([list(row)], dtype=torch.float32)).item()

    def cleanup(self) -> None:
        """Release what initialize() loaded."""


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
        self.width = len(values)

    def run(self, X: torch.Tensor) -> torch.Tensor:
        import torch

        if self._coef_column is None:
            self._coef_column = torch.tensor(self._coef_values, dtype=torch.float32).reshape(-1, 1)
        return torch.mm(X, self._coef_column)

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
            raise ModelError(f"cannot load {self.path}: {first_line(error)}") from None
        if self.requested_width and own_width and own_width != self.requested_width:
            raise ModelError(
                f"{self.path} takes {own_width} inputs per row, but this server serves {self.requested_width}"
                " (restart it to serve another width)"
            )
        width = self.requested_width or own_width
        if width is None:
            raise ModelError(f"cannot tell the input width of {self.path}; pass --input-width")
        self._check_output_shape(module, width)
        self._module, self.width = module, width

    def _check_output_shape(self, module: Callable[[torch.Tensor], torch.Tensor], width: int) -> None:
        import torch

        probe = torch.zeros(2, width)
        try:
            with torch.inference_mode():
                output = module(probe)
        except Exception as error:  # the model's own code failed on a well-formed input
            raise ModelError(f"{self.path} fails on a (2, {width}) input: {first_line(error)}") from None
        if not isinstance(output, torch.Tensor) or output.numel() != 2:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ModelError(f"{self.path} returns {shape} for 2 rows; a served model must return one value per row")

    def run(self, X: torch.Tensor) -> torch.Tensor:
        import torch

        if self._module is None:
            raise ModelError(f"{self.path} is not loaded")
        with torch.inference_mode():
            y = self._module(X)
        return one_value_per_row(y, rows=X.shape[0])

    def cleanup(self) -> None:
        self._module = None


def _load_torchscript(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], int | None]:
    """The module, and its width: its own `input_width` attribute, else its first linear layer's in_features."""
    import torch

    module = torch.jit.load(str(path), map_location="cpu").eval()
    for candidate in (module, *module.modules()):
        for attribute in ("input_width", "in_features"):
            width = getattr(candidate, attribute, None)
            if isinstance(width, int) and width > 0:
                return module, width
    return module, None


def _load_exported_program(path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], int | None]:
    """The program's module, and its width: the static second dimension of its input."""
    import torch

    program = torch.export.load(str(path))
    user_inputs = set(program.graph_signature.user_inputs)
    first_input = next(node for node in program.graph.nodes if node.op == "placeholder" and node.name in user_inputs)
    shape = tuple(getattr(first_input.meta.get("val"), "shape", ()))
    width = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
    return program.module(), width


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
