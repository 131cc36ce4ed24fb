"""A stand-in for the course's docker_autograde.py, written from its description in issue 13.

Graders copy it into the project folder and run `docker exec CONTAINER python3 docker_autograde.py` with that
folder bind-mounted as the working directory. Like theirs, it imports the folder's stubs (they come first on
its path), grpc, numpy and FieldDescriptor (reading `.label`), calls the server on 127.0.0.1:5440, runs
`python3 client.py 5440 1,2,3 workload/<file>.csv`, and writes its scores as test.json into the working
directory. Nothing of the project's own code is imported: a grader's script does not.
"""

import functools
import json
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor

import modelserver_pb2
import modelserver_pb2_grpc

POINTS = 10
EXPECTED_FIELDS = {
    "SetCoefsRequest": [("coefs", FieldDescriptor.LABEL_REPEATED, FieldDescriptor.TYPE_FLOAT)],
    "SetCoefsResponse": [("error", FieldDescriptor.LABEL_OPTIONAL, FieldDescriptor.TYPE_STRING)],
    "PredictRequest": [("X", FieldDescriptor.LABEL_REPEATED, FieldDescriptor.TYPE_FLOAT)],
    "PredictResponse": [
        ("y", FieldDescriptor.LABEL_OPTIONAL, FieldDescriptor.TYPE_FLOAT),
        ("hit", FieldDescriptor.LABEL_OPTIONAL, FieldDescriptor.TYPE_BOOL),
        ("error", FieldDescriptor.LABEL_OPTIONAL, FieldDescriptor.TYPE_STRING),
    ],
}
WORKLOADS = {
    "client_workload_1": (["workload/no_repeats.csv"], "0.0"),
    "client_workload_2": (["workload/lru_order.csv"], "0.3333333333333333"),
}

stub = modelserver_pb2_grpc.ModelServerStub(grpc.insecure_channel("127.0.0.1:5440"))


def protobuf_interface() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for message, expected in EXPECTED_FIELDS.items():
            fields = modelserver_pb2.DESCRIPTOR.message_types_by_name[message].fields
            assert [(f.name, f.label, f.type) for f in fields] == expected, message


def set_coefs() -> None:
    assert stub.SetCoefs(modelserver_pb2.SetCoefsRequest(coefs=[1, 2, 3]), timeout=10).error == ""


def predict(*x: float) -> modelserver_pb2.PredictResponse:
    reply = stub.Predict(modelserver_pb2.PredictRequest(X=x), timeout=10)
    assert reply.error == "", reply.error
    return reply


def predict_values() -> None:
    set_coefs()
    x = np.array([0.5, 1.25, -2.0], dtype=np.float32)
    assert predict(*x.tolist()).y == float(np.dot(x, np.array([1, 2, 3], dtype=np.float32)))


def predict_cache() -> None:
    set_coefs()
    assert [predict(4, 5, 6).hit, predict(4, 5, 6).hit] == [False, True]


def eviction_and_invalidation() -> None:
    set_coefs()
    predict(1, 1, 1)
    for i in range(10):
        predict(100 + i, 0, 0)
    assert not predict(1, 1, 1).hit
    assert predict(1, 1, 1).hit
    set_coefs()
    assert not predict(1, 1, 1).hit


def client_last_line(csvs: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, "client.py", "5440", "1,2,3", *csvs], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout.strip().splitlines()[-1]


def client_threads() -> None:
    rate = float(client_last_line(["workload/threads_a.csv", "workload/threads_b.csv", "workload/threads_c.csv"]))
    assert 0.0 <= rate <= 1.0


def client_workload(csvs: list[str], expected: str) -> None:
    line = client_last_line(csvs)
    assert line == expected, line


def main() -> None:
    tests: dict[str, Callable[[], object]] = {
        "protobuf_interface": protobuf_interface,
        "set_coefs": set_coefs,
        "predict": predict_values,
        "predict_cache": predict_cache,
        "eviction_and_invalidation": eviction_and_invalidation,
        "client_threads": client_threads,
        **{name: functools.partial(client_workload, csvs, rate) for name, (csvs, rate) in WORKLOADS.items()},
    }
    scores: dict[str, dict[str, object]] = {}
    for name, test in tests.items():
        try:
            test()
            scores[name] = {"score": POINTS, "max": POINTS}
        except Exception:  # a grader scores every failure as zero and records why
            scores[name] = {"score": 0, "max": POINTS, "error": traceback.format_exc(limit=2)}
    with open("test.json", "w") as results:  # noqa: PTH123 (a grader's script, written as graders write it)
        json.dump(scores, results, indent=2)


if __name__ == "__main__":
    main()
