"""Model files served through the same cache: the example model, reloads, and models the server refuses."""

import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from torch import nn

from serverproc import start_server
from stubs import pb2, pb2_grpc
from tests.fixtures import ROOT, predict, train_example


class Scaled(nn.Module):
    """y = factor * sum(x): the answer reveals which model produced it."""

    input_width: int

    def __init__(self, factor: float, width: int = 3):
        super().__init__()
        self.input_width = width
        self.factor = factor

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.factor * X.sum(dim=1, keepdim=True)


class SumOnly(nn.Module):
    """Works for any width, so the file cannot tell the server its width."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.sum(dim=1)


class NoBatch(nn.Module):
    input_width: int

    def __init__(self):
        super().__init__()
        self.input_width = 3

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.sum()


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.linear(X)


def save(module: nn.Module, path):
    torch.jit.script(module).save(str(path))
    return path


@pytest.fixture(scope="module")
def example_model(tmp_path_factory):
    return train_example("train_linear.py", tmp_path_factory.mktemp("model") / "linear.pt")


def serve(model_path, *args):
    return start_server(["--model", str(model_path), *args])


def test_the_example_model_learned_the_generating_weights(example_model):
    module = torch.jit.load(str(example_model))
    assert module.linear.weight.flatten().tolist() == pytest.approx([2.0, -1.0, 0.5], abs=0.02)
    assert module.linear.bias.item() == pytest.approx(3.0, abs=0.02)


def test_serves_the_example_model_through_the_cache(example_model):
    module = torch.jit.load(str(example_model))
    with serve(example_model) as server, server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        first = predict(stub, 1.0, 2.0, 3.0)
        expected = module(torch.tensor([[1.0, 2.0, 3.0]])).item()
        assert (first.y, first.hit, first.error) == (pytest.approx(expected, abs=1e-6), False, "")
        assert predict(stub, 1.00004, 2.0, 3.0).hit
        for i in range(10):
            predict(stub, 10.0 + i, 0.0, 0.0)
        assert not predict(stub, 1.0, 2.0, 3.0).hit
        stats = stub.GetStats(pb2.GetStatsRequest())
        assert (stats.hits, stats.misses, stats.evictions, stats.size) == (1, 12, 2, 10)
    assert f"model: {example_model}" in server.log


def test_a_wrong_width_gets_a_clear_error(example_model):
    with serve(example_model) as server, server.channel() as channel:
        reply = predict(pb2_grpc.ModelServerStub(channel), 1.0, 2.0)
    assert reply.error == "X has 2 values per row but the model takes 3"


def test_set_coefs_is_refused_and_changes_nothing_while_a_file_is_served(example_model):
    with serve(example_model) as server, server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        before = predict(stub, 1.0, 1.0, 1.0).y
        reply = stub.SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3]))
        after = predict(stub, 1.0, 1.0, 1.0)
    assert f"serves the model file {example_model}; SetCoefs changes nothing" in reply.error
    assert (after.y, after.hit) == (before, True)


def reload_by_rpc(server, stub):
    assert stub.ReloadModel(pb2.ReloadModelRequest()).error == ""


def reload_by_sighup(server, stub):
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "reloaded" not in server.log and time.monotonic() < deadline:
        time.sleep(0.05)  # the log line is the only sign a signal was handled


@pytest.mark.parametrize("reload", [reload_by_rpc, reload_by_sighup], ids=["rpc", "sighup"])
def test_a_reload_swaps_the_model_and_empties_the_cache(tmp_path, reload):
    path = save(Scaled(1.0), tmp_path / "model.pt")
    with serve(path) as server, server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        assert predict(stub, 1, 2, 3).y == 6.0
        save(Scaled(10.0), path)
        reload(server, stub)
        reply = predict(stub, 1, 2, 3)
    assert (reply.y, reply.hit) == (60.0, False)


def test_a_reload_of_a_corrupt_file_keeps_the_old_model_and_says_why(tmp_path):
    path = save(Scaled(1.0), tmp_path / "model.pt")
    with serve(path) as server, server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        predict(stub, 1, 2, 3)
        path.write_bytes(b"not a model")
        error = stub.ReloadModel(pb2.ReloadModelRequest()).error
        reply = predict(stub, 1, 2, 3)
    assert error.startswith(f"cannot load {path}:")
    assert (reply.y, reply.hit) == (6.0, True)


def test_reload_needs_the_admin_token_when_one_is_set(tmp_path):
    path = save(Scaled(1.0), tmp_path / "model.pt")
    with serve(path, "--admin-token", "s3cret") as server, server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ReloadModel(pb2.ReloadModelRequest())
        accepted = stub.ReloadModel(pb2.ReloadModelRequest(), metadata=(("authorization", "Bearer s3cret"),))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert accepted.error == ""


def test_the_width_flag_serves_a_model_that_cannot_tell_its_width(tmp_path):
    path = save(SumOnly(), tmp_path / "sum.pt")
    with serve(path, "--input-width", "4") as server, server.channel() as channel:
        reply = predict(pb2_grpc.ModelServerStub(channel), 1, 2, 3, 4)
    assert reply.y == 10.0


def start_refused(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "server.py"), "--host", "127.0.0.1", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "make_model, extra, message",
    [
        (lambda d: d / "missing.pt", (), "cannot load {path}:"),
        (lambda d: (d / "corrupt.pt").write_bytes(b"\x00garbage") and d / "corrupt.pt", (), "cannot load {path}:"),
        (
            lambda d: save(NoBatch(), d / "nobatch.pt"),
            (),
            "{path} returns y of shape () and type torch.float32 for 2 rows; a served model returns numbers with the"
            " batch first",
        ),
        (lambda d: save(SumOnly(), d / "sum.pt"), (), "cannot tell the input width of {path}; pass --input-width"),
    ],
    ids=["missing", "corrupt", "no-batch-dimension", "unknown-width"],
)
def test_unusable_model_files_are_refused_at_start_with_one_line(tmp_path, make_model, extra, message):
    path = make_model(tmp_path)
    result = start_refused("--model", str(path), *extra)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(path=path) in lines[0], result.stderr


def test_client_queries_a_served_model_file_without_setting_coefficients(example_model):
    with serve(example_model) as server:
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "client.py"),
                "--host",
                "127.0.0.1",
                str(server.port),
                "-",
                str(ROOT / "workloads" / "lru_order.csv"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0.3333333333333333"


def test_serves_and_reloads_a_torch_export_program(tmp_path):
    path = train_example("train_linear.py", tmp_path / "linear.pt2")
    expected = torch.export.load(str(path)).module()(torch.tensor([[1.0, 2.0, 3.0]])).item()
    with serve(path) as server, server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        first, second = predict(stub, 1.0, 2.0, 3.0), predict(stub, 1.0, 2.0, 3.0)
        wrong_width = predict(stub, 1.0, 2.0)
        assert stub.ReloadModel(pb2.ReloadModelRequest()).error == ""
        after_reload = predict(stub, 1.0, 2.0, 3.0)
    assert (first.y, first.hit, second.hit) == (pytest.approx(expected, abs=1e-6), False, True)
    assert wrong_width.error == "X has 2 values per row but the model takes 3"
    assert (after_reload.y, after_reload.hit) == (first.y, False)


def test_a_reload_that_changes_the_width_is_refused_with_the_widths_in_the_answer_and_the_log(tmp_path):
    path = save(Scaled(1.0, width=3), tmp_path / "model.pt")
    with serve(path) as server, server.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        save(Scaled(2.0, width=5), path)
        error = stub.ReloadModel(pb2.ReloadModelRequest()).error
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "reload failed" not in server.log and time.monotonic() < deadline:
            time.sleep(0.05)  # the log line is the only sign a signal was handled
        reply = predict(stub, 1, 2, 3)
    expected = f"{path} takes 5 inputs per row, but this server serves 3 (restart it to serve another width)"
    assert error == expected
    assert f"reload failed, the old model keeps serving: {expected}" in server.log
    assert (reply.error, reply.y) == ("", 6.0)


def test_a_model_with_two_values_per_row_is_served_and_predict_says_to_call_model_infer(tmp_path):
    path = save(TwoOutputs(), tmp_path / "two.pt")
    with serve(path) as server, server.channel() as channel:
        reply = predict(pb2_grpc.ModelServerStub(channel), 1, 2, 3)
    assert reply.error == "this model takes X FP32 [3] and gives more than one value per row: call ModelInfer"
