"""The Open Inference Protocol on the real server, through tritonclient (in a process of its own) and through
the server's own stubs where a test needs requests tritonclient never makes (typed contents, bad bytes)."""

import functools
import json
import struct
import subprocess
import sys
import threading

import grpc
import pytest
import torch
from torch import nn

import inference_pb2 as oip
import inference_pb2_grpc as oip_grpc
from models import dot_float32
from server import round_row
from serverproc import start_server
from stubs import pb2, pb2_grpc
from tests.fixtures import ROOT, predict, run_concurrently, train_example

SESSION = ROOT / "tests" / "tritonclient_session.py"


def triton(server, *calls: dict) -> list:
    """tritonclient's answers to the calls, in order: {"result": ...} or {"error": [status, message]}."""
    result = subprocess.run(
        [sys.executable, str(SESSION), server.address],
        input=json.dumps(list(calls)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def infer(model: str, *inputs: tuple[str, str, list], **options) -> dict:
    given = [{"name": name, "datatype": datatype, "data": data} for name, datatype, data in inputs]
    return {"call": "infer", "model": model, "inputs": given, **options}


def bits(value: float) -> bytes:
    return struct.pack("<f", value)


@pytest.fixture(scope="module")
def linear():
    """The linear model, with room for a batch of 64 rows in the cache."""
    with start_server(["--cache-size", "128"]) as server, server.channel() as channel:
        pb2_grpc.ModelServerStub(channel).SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3]))
        yield server


@pytest.fixture
def fresh_linear(linear):
    """Coefficients [1, 2, 3] set anew: an empty cache."""
    with linear.channel() as channel:
        pb2_grpc.ModelServerStub(channel).SetCoefs(pb2.SetCoefsRequest(coefs=[1, 2, 3]))
    return linear


def test_health_metadata_and_config_as_tritonclient_reads_them(linear):
    live, ready, model_ready, server_meta, model_meta, config, stats = triton(
        linear,
        {"call": "is_server_live"},
        {"call": "is_server_ready"},
        {"call": "is_model_ready", "model": "linear"},
        {"call": "get_server_metadata"},
        {"call": "get_model_metadata", "model": "linear"},
        {"call": "get_model_config", "model": "linear"},
        {"call": "get_inference_statistics", "model": "linear"},
    )
    assert live["result"] is ready["result"] is model_ready["result"] is True
    assert server_meta["result"]["name"] == "modelserver"
    assert model_meta["result"] == {
        "name": "linear",
        "versions": ["1"],
        "platform": "linear",
        "inputs": [{"name": "X", "datatype": "FP32", "shape": ["-1", "3"]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": ["-1", "1"]}],
    }
    assert config["result"]["config"]["maxBatchSize"] == 4096
    assert config["result"]["config"]["input"] == [{"name": "X", "dataType": "TYPE_FP32", "dims": ["3"]}]
    assert config["result"]["config"]["output"] == [{"name": "y", "dataType": "TYPE_FP32", "dims": ["1"]}]
    assert stats["result"]["modelStats"][0]["name"] == "linear"


def test_a_batch_mixing_hits_and_misses_counts_rows_exactly(fresh_linear):
    x = [[1, 2, 3], [4, 5, 6], [1, 2, 3], [1.00004, 2.00001, 2.99996], [7, 8, 9]]
    with fresh_linear.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        before = stub.GetStats(pb2.GetStatsRequest())
        assert not predict(stub, 7, 8, 9).hit  # one row cached through Predict first
        first, second = triton(
            fresh_linear, infer("linear", ("X", "FP32", x), id="batch-1"), infer("linear", ("X", "FP32", x))
        )
        after = stub.GetStats(pb2.GetStatsRequest())
    assert first["result"]["id"] == "batch-1"
    assert first["result"]["outputs"]["y"] == {
        "datatype": "FP32",
        "shape": [5, 1],
        "data": [[14.0], [32.0], [14.0], [14.0], [50.0]],
    }
    assert first["result"]["cached_rows"] == 3  # [1,2,3] twice more (once rounded to it), and [7,8,9] from Predict
    assert second["result"]["cached_rows"] == 5
    assert (after.hits - before.hits, after.misses - before.misses) == (3 + 5, 1 + 2)


def test_a_linear_row_is_the_same_bits_by_any_path_and_in_any_batch(fresh_linear):
    generator = torch.Generator().manual_seed(7)
    rows = (torch.randn(64, 3, generator=generator) * 100).tolist()
    with fresh_linear.channel() as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        stub.SetCoefs(pb2.SetCoefsRequest(coefs=[0.1, -2.7, 3.3]))
        batch, again = triton(fresh_linear, infer("linear", ("X", "FP32", rows)), infer("linear", ("X", "FP32", rows)))
        alone = [predict(stub, *row) for row in rows]
    fresh = [bits(y[0]) for y in batch["result"]["outputs"]["y"]["data"]]
    cached = [bits(y[0]) for y in again["result"]["outputs"]["y"]["data"]]
    assert fresh == cached == [bits(reply.y) for reply in alone]
    assert all(reply.hit for reply in alone) and again["result"]["cached_rows"] == 64
    coefs = torch.tensor([0.1, -2.7, 3.3]).tolist()  # as float32
    assert fresh == [bits(dot_float32(round_row(row), coefs)) for row in rows]


def test_typed_contents_are_taken_and_raw_outputs_given(fresh_linear):
    with fresh_linear.channel() as channel:
        request = oip.ModelInferRequest(model_name="linear", id="typed")
        request.inputs.add(name="X", datatype="FP32", shape=[2, 3]).contents.fp32_contents.extend([1, 2, 3, 0, 0, 1])
        reply = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert reply.id == "typed" and [output.name for output in reply.outputs] == ["y"]
    assert struct.unpack("<2f", reply.raw_output_contents[0]) == (14.0, 3.0)


def raw_request(shape: list[int], payload: bytes, datatype: str = "FP32", name: str = "X") -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="linear")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(payload)
    return request


def mixed_request() -> oip.ModelInferRequest:
    request = raw_request([1, 3], struct.pack("<3f", 1, 2, 3))
    request.inputs[0].contents.fp32_contents.extend([1, 2, 3])
    return request


@pytest.mark.parametrize(
    "request_, code, message",
    [
        (raw_request([1, 3], b"\x00" * 8), "INVALID_ARGUMENT", "input 'X' has 8 bytes of raw contents, but shape [1, 3] of FP32 takes 12"),
        (mixed_request(), "INVALID_ARGUMENT", "the request mixes raw_input_contents and typed contents"),
        (raw_request([1, 3], b"\x00" * 24, "FP64"), "INVALID_ARGUMENT", "input 'X' is FP64 (a datatype of the protocol); this server takes FP32, INT64 and INT32"),
        (raw_request([1, 3], b"\x00" * 12, "float32"), "INVALID_ARGUMENT", "input 'X' is float32 (not a protocol datatype)"),
        (raw_request([1, 3], b"\x00" * 24, "INT64"), "INVALID_ARGUMENT", "input 'X' is INT64, but the model takes FP32"),
        (raw_request([3], b"\x00" * 12), "INVALID_ARGUMENT", "input 'X' has shape [3], but the model takes [-1, 3] (rows first)"),
        (raw_request([1, 3], b"\x00" * 12, name="x"), "INVALID_ARGUMENT", "unknown input 'x': the model takes X FP32 [3]"),
        (oip.ModelInferRequest(model_name="linear"), "INVALID_ARGUMENT", "missing input 'X': the model takes X FP32 [3]"),
        (oip.ModelInferRequest(model_name="nope"), "NOT_FOUND", "unknown model 'nope': this server serves 'linear'"),
        (oip.ModelInferRequest(model_name="linear", model_version="2"), "NOT_FOUND", "model 'linear' has no version '2'; it has '1'"),
        (raw_request([5000, 3], b"\x00" * 60000), "INVALID_ARGUMENT", "input 'X' has 5000 rows; a request may carry at most 4096"),
    ],
    ids=["byte-length", "mixed", "fp64", "not-a-datatype", "int64", "shape", "unknown-input", "missing-input",
         "unknown-model", "unknown-version", "too-many-rows"],
)  # fmt: skip
def test_bad_requests_get_the_status_a_triton_user_expects(fresh_linear, request_, code, message):
    with fresh_linear.channel() as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request_, timeout=10)
        still = stub.ModelInfer(raw_request([1, 3], struct.pack("<3f", 1, 2, 3)), timeout=10)
    assert refused.value.code().name == code
    assert str(refused.value.details()).startswith(message)
    assert struct.unpack("<f", still.raw_output_contents[0]) == (14.0,)


def test_an_unknown_output_and_a_model_before_set_coefs_are_refused_clearly(linear):
    with start_server() as bare:
        before = triton(bare, infer("linear", ("X", "FP32", [[1, 2, 3]])))
    unknown = triton(linear, infer("linear", ("X", "FP32", [[1, 2, 3]]), outputs=["z"]))
    assert before[0]["error"] == ["StatusCode.UNAVAILABLE", "model 'linear' is not ready: call SetCoefs first"]
    assert unknown[0]["error"] == ["StatusCode.INVALID_ARGUMENT", "unknown output 'z': the model gives y"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return train_example("train_classifier.py", tmp_path_factory.mktemp("classifier") / "classifier.pt2")


def test_the_example_classifier_is_served_with_its_own_names_and_shapes(classifier):
    sys.path.insert(0, str(ROOT / "examples"))
    from train_classifier import make_images

    images = make_images(torch.tensor([0, 3, 7, 9]), torch.Generator().manual_seed(2))
    images = torch.cat([images, images[1:2]])  # the fifth image is the second again
    expected = torch.export.load(str(classifier)).module()(images)
    with start_server(["--model", str(classifier)]) as server:
        meta, both, subset = triton(
            server,
            {"call": "get_model_metadata", "model": "classifier"},
            infer("classifier", ("image", "FP32", images.tolist())),
            infer("classifier", ("image", "FP32", images.tolist()), outputs=["probabilities"]),
        )
    assert meta["result"]["inputs"] == [{"name": "image", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert [output["name"] for output in meta["result"]["outputs"]] == ["logits", "probabilities"]
    outputs = both["result"]["outputs"]
    rounded = torch.export.load(str(classifier)).module()(torch.round(images, decimals=4))
    assert torch.allclose(torch.tensor(outputs["logits"]["data"]), rounded["logits"], atol=1e-5)
    assert torch.allclose(torch.tensor(outputs["probabilities"]["data"]), expected["probabilities"], atol=1e-3)
    assert both["result"]["cached_rows"] == 1  # the fifth row repeats the second
    assert list(subset["result"]["outputs"]) == ["probabilities"] and subset["result"]["cached_rows"] == 5


class Lookup(nn.Module):
    """Two inputs, one of integers: y = table[index] * scale, per row."""

    def forward(self, index: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (index.to(torch.float32) * 10 + 1) * scale


def test_a_torchscript_model_of_two_inputs_is_served_from_its_description(tmp_path):
    path = tmp_path / "lookup.pt"
    torch.jit.script(Lookup()).save(str(path))
    description = {"inputs": [{"name": "index", "datatype": "INT64", "shape": [1]},
                              {"name": "scale", "datatype": "FP32", "shape": [2]}], "outputs": ["scaled"]}  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps(description))
    with start_server(["--model", str(path)]) as server:
        (answer,) = triton(
            server, infer("lookup", ("index", "INT64", [[2], [3]]), ("scale", "FP32", [[1, 0.5], [2, 1]]))
        )
    assert answer["result"]["outputs"]["scaled"]["data"] == [[21.0, 10.5], [62.0, 31.0]]


def test_16_clients_never_get_a_row_from_a_model_replaced_before_their_call(linear):
    """Version k has coefs [k, k, k]; a row [a, 0, 0] answers k * a, so every row names its model."""
    version, problems, stop = [1], [], threading.Event()
    with linear.channel() as channel:
        setter = pb2_grpc.ModelServerStub(channel)
        setter.SetCoefs(pb2.SetCoefsRequest(coefs=[1, 1, 1]))
        infer_stub = oip_grpc.GRPCInferenceServiceStub(channel)

        def change_models() -> None:
            while not stop.is_set() and version[0] < 400:
                setter.SetCoefs(pb2.SetCoefsRequest(coefs=[version[0] + 1] * 3))
                version[0] += 1

        def client(worker: int) -> None:
            for call in range(40):
                rows = [(worker * 64 + row + 1) % 7 + 1 for row in range(64)]
                oldest_allowed = version[0]
                request = raw_request([64, 3], b"".join(struct.pack("<3f", a, 0, 0) for a in rows))
                reply = infer_stub.ModelInfer(request, timeout=30)
                answers = struct.unpack("<64f", reply.raw_output_contents[0])
                for a, y in zip(rows, answers, strict=True):
                    if y / a < oldest_allowed:
                        problems.append(
                            f"client {worker} call {call}: {y} for {a} from model {y / a} < {oldest_allowed}"
                        )

        changer = threading.Thread(target=change_models)
        changer.start()
        try:
            run_concurrently(functools.partial(client, worker) for worker in range(16))
        finally:
            stop.set()
            changer.join(30)
    assert problems == []
    assert version[0] > 1


def test_the_example_linear_model_file_answers_as_torch_does(tmp_path):
    path = train_example("train_linear.py", tmp_path / "trained.pt")
    x = [[0.5, -1.25, 2.0], [3.0, 0.0, -0.75]]
    expected = torch.jit.load(str(path))(torch.round(torch.tensor(x), decimals=4)).reshape(-1).tolist()
    with start_server(["--model", str(path)]) as server:
        meta, answer = triton(
            server, {"call": "get_model_metadata", "model": "trained"}, infer("trained", ("X", "FP32", x))
        )
    assert meta["result"]["inputs"] == [{"name": "X", "datatype": "FP32", "shape": ["-1", "3"]}]
    assert [y for (y,) in answer["result"]["outputs"]["y"]["data"]] == pytest.approx(expected, abs=1e-6)
