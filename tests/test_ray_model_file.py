"""A model file on the Ray Serve fleet with an admin token: ReloadModel reaches every replica before it
returns, like SetCoefs; a file that would not load is refused with the old model serving everywhere; the
token guards the changes as on a single server."""

import os
from pathlib import Path

import grpc
import pytest
import torch
from torch import nn

from stubs import pb2
from tests.ray_fleet import CALL_TIMEOUT, REPLICAS, predict, predict_during_changes, running_fleet

TOKEN = "fleet-s3cret"
AUTHORIZED = (("authorization", f"Bearer {TOKEN}"),)


class Scaled(nn.Module):
    """y = k * sum(X): every answer tells which file it came from."""

    input_width: int

    def __init__(self, k: float):
        super().__init__()
        self.input_width = 3
        self.k = k

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.sum(dim=1, keepdim=True) * self.k


def write_model(path: Path, k: float) -> None:
    """Replace the file at once, as a deploy would: a replica never reads half a file."""
    staged = path.with_suffix(".staged")
    torch.jit.script(Scaled(k)).save(str(staged))
    staged.replace(path)


def test_reload_is_in_force_on_every_replica_once_it_returns(tmp_path):
    model = tmp_path / "scaled.pt"
    write_model(model, 1.0)
    with running_fleet(["--model", str(model)], env={**os.environ, "MODELSERVER_ADMIN_TOKEN": TOKEN}) as fleet:

        def reload(k: float) -> None:
            write_model(model, k)
            reply = fleet.stub.ReloadModel(pb2.ReloadModelRequest(), metadata=AUTHORIZED, timeout=CALL_TIMEOUT)
            assert reply.error == ""

        churn = predict_during_changes(
            fleet,
            reload,
            (2.0, 3.0, 4.0, 5.0),
            in_force=1.0,
            callers=8,
            draw_row=lambda rows: [1.0, float(rows.randrange(4)), 0.0],
            least_answer=lambda X, k: k * sum(X),
        )
        assert churn.in_force == 5.0
        assert churn.errors == []
        assert churn.stale == []

        model.write_bytes(b"not a model")
        assert fleet.stub.ReloadModel(pb2.ReloadModelRequest(), metadata=AUTHORIZED, timeout=CALL_TIMEOUT).error
        answers = [predict(fleet, [1.0, float(i), 0.0]) for i in range(40)]
        assert len({replica for _, replica in answers}) == REPLICAS
        assert [reply.y for reply, _ in answers] == [5.0 * (1 + i) for i in range(40)]

        refused = fleet.stub.SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3]), metadata=AUTHORIZED, timeout=CALL_TIMEOUT)
        assert "serves the model file" in refused.error
        for change in (
            fleet.stub.SetCoefs.future(pb2.SetCoefsRequest(coefs=[1, 2, 3])),
            fleet.stub.ReloadModel.future(pb2.ReloadModelRequest()),
        ):
            with pytest.raises(grpc.RpcError) as without_token:
                change.result(timeout=CALL_TIMEOUT)
            assert without_token.value.code() == grpc.StatusCode.PERMISSION_DENIED
