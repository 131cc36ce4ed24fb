"""Run calls through tritonclient's gRPC client and print what came back, as JSON: for the tests.

    python3 tests/tritonclient_session.py HOST:PORT < calls.json

tritonclient carries its own compiled copy of the protocol's messages, and protobuf refuses two copies of
`inference.*` in one process, so the tests (which import the server's copy) run it here, in a process of
its own. Each call is {"call": METHOD, ...}; each answer is {"result": ...} or {"error": [STATUS, MESSAGE]}.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from google.protobuf.json_format import MessageToDict


def infer(client: triton.InferenceServerClient, call: dict) -> dict:
    inputs = []
    for given in call["inputs"]:
        data = np.array(given["data"], dtype=triton.triton_to_np_dtype(given["datatype"]))
        tensor = triton.InferInput(given["name"], list(data.shape), given["datatype"])
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput(name) for name in call.get("outputs", [])] or None
    result = client.infer(
        call["model"], inputs, model_version=call.get("version", ""), outputs=outputs, request_id=call.get("id", "")
    )
    response = result.get_response()
    return {
        "id": response.id,
        "cached_rows": response.parameters["cached_rows"].int64_param,
        "outputs": {
            output.name: {"datatype": output.datatype, "shape": list(output.shape),
                          "data": result.as_numpy(output.name).tolist()}
            for output in response.outputs
        },
    }  # fmt: skip


def answer(client: triton.InferenceServerClient, call: dict) -> object:
    method = call["call"]
    if method == "infer":
        return infer(client, call)
    if method in ("is_server_live", "is_server_ready"):
        return getattr(client, method)()
    if method == "is_model_ready":
        return client.is_model_ready(call["model"], call.get("version", ""))
    if method == "get_server_metadata":
        return MessageToDict(client.get_server_metadata())
    return MessageToDict(getattr(client, method)(call["model"], call.get("version", "")))


def main() -> None:
    client = triton.InferenceServerClient(url=sys.argv[1])
    answers = []
    for call in json.load(sys.stdin):
        try:
            answers.append({"result": answer(client, call)})
        except triton.InferenceServerException as error:
            answers.append({"error": [str(error.status()), error.message()]})
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
