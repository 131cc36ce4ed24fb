"""Train a small linear regression with SGD on generated data and export it for the server.

    python3 examples/train_linear.py examples/linear.pt     TorchScript
    python3 examples/train_linear.py examples/linear.pt2    a torch.export program
    python3 server.py --model examples/linear.pt

Nothing is downloaded: the data are y = X @ [2, -1, 0.5] + 3 plus a little noise.
"""

import argparse
from pathlib import Path

import torch
from torch import nn

TRUE_WEIGHTS = torch.tensor([[2.0], [-1.0], [0.5]])
TRUE_BIAS = 3.0


class LinearRegression(nn.Module):
    """nn.Linear with the input width recorded, so the server can read it from the file."""

    input_width: int

    def __init__(self, width: int):
        super().__init__()
        self.input_width = width
        self.linear = nn.Linear(width, 1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.linear(X)


def make_data(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    X = torch.randn(rows, TRUE_WEIGHTS.shape[0], generator=generator)
    noise = 0.01 * torch.randn(rows, 1, generator=generator)
    return X, X @ TRUE_WEIGHTS + TRUE_BIAS + noise


def train(epochs: int, seed: int) -> LinearRegression:
    generator = torch.Generator().manual_seed(seed)
    X, y = make_data(1024, generator)
    model = LinearRegression(X.shape[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(epochs):
        for batch in torch.randperm(len(X), generator=generator).split(64):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(X[batch]), y[batch])
            loss.backward()
            optimizer.step()
    return model.eval()


def save(model: LinearRegression, output: Path) -> None:
    """A .pt2 file gets a torch.export program with any number of rows; anything else TorchScript."""
    if output.suffix == ".pt2":
        example = torch.zeros(2, model.input_width)
        program = torch.export.export(model, (example,), dynamic_shapes={"X": {0: torch.export.Dim("rows")}})
        torch.export.save(program, str(output))
    else:
        torch.jit.script(model).save(str(output))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="where to write the model: .pt2 for torch.export, else TorchScript")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = train(args.epochs, args.seed)
    save(model, args.output)
    weights = ", ".join(f"{w:.3f}" for w in model.linear.weight.flatten().tolist())
    print(f"wrote {args.output}: weights [{weights}], bias {model.linear.bias.item():.3f}")


if __name__ == "__main__":
    main()
