"""Ask a served classifier about four generated images, with tritonclient, as any Triton user would.

    python3 examples/train_classifier.py examples/classifier.pt2
    python3 server.py --model examples/classifier.pt2 &
    python3 examples/query_classifier.py 127.0.0.1:5440

Sent twice: the second answer comes from the server's cache, row by row (`cached_rows`).
"""

import argparse

import torch
import tritonclient.grpc as triton
from train_classifier import make_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="127.0.0.1:5440", help="the server's HOST:PORT")
    args = parser.parse_args()
    labels = torch.tensor([0, 3, 7, 9])
    images = make_images(labels, torch.Generator().manual_seed(2)).numpy()
    client = triton.InferenceServerClient(url=args.url)
    print(client.get_model_metadata("classifier"))
    image = triton.InferInput("image", list(images.shape), "FP32")
    image.set_data_from_numpy(images)
    for attempt in ("first", "again"):
        result = client.infer("classifier", [image], outputs=[triton.InferRequestedOutput("probabilities")])
        predicted = result.as_numpy("probabilities").argmax(axis=1).tolist()
        cached = result.get_response().parameters["cached_rows"].int64_param
        print(f"{attempt}: labels {labels.tolist()}, predicted {predicted}, {cached} of {len(labels)} rows cached")


if __name__ == "__main__":
    main()
