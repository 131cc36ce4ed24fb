"""Train a small image classifier on generated 28x28 images and export it as a torch.export program.

    python3 examples/train_classifier.py examples/classifier.pt2
    python3 server.py --model examples/classifier.pt2          served as "classifier"
    python3 examples/query_classifier.py 127.0.0.1:5440       asks it with tritonclient

Its input is `image`, FP32 [-1, 1, 28, 28]; it gives two outputs, `logits` and `probabilities`, FP32
[-1, 10]: the server reads all of that from the program's signature. Nothing is downloaded: class k is a
bright 6x6 square at one of ten places, on noise (`make_images`, which the query example uses too).
"""

import argparse
from pathlib import Path

import torch
from torch import nn

CLASSES = 10
PLACES = [(row, column) for row in (2, 11, 20) for column in (2, 11, 20)] + [(11, 11)]


def make_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One (1, 28, 28) image per label: noise, and a bright square where the label says."""
    images = torch.rand(len(labels), 1, 28, 28, generator=generator) * 0.3
    for index, label in enumerate(labels.tolist()):
        row, column = PLACES[label]
        images[index, 0, row : row + 6, column : column + 6] += 0.7 + 0.3 * (label == CLASSES - 1)
    return images


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, CLASSES))

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.layers(image)
        return {"logits": logits, "probabilities": torch.softmax(logits, dim=1)}


def train(steps: int = 300, seed: int = 0) -> Classifier:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        labels = torch.randint(0, CLASSES, (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(make_images(labels, generator))["logits"], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def export(model: Classifier, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = torch.zeros(2, 1, 28, 28)
    program = torch.export.export(model, (example,), dynamic_shapes={"image": {0: batch}})
    torch.export.save(program, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="where to save the program (.pt2)")
    args = parser.parse_args()
    model = train()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (500,), generator=generator)
    accuracy = (model(make_images(labels, generator))["logits"].argmax(dim=1) == labels).float().mean().item()
    export(model, args.path)
    print(f"saved {args.path}: accuracy {accuracy:.3f} on 500 new images")


if __name__ == "__main__":
    main()
