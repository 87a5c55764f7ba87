"""Sequence classification of handwritten digits with rnnfast.

scikit-learn's bundled digits dataset (``sklearn.datasets.load_digits``:
1797 8x8 images, shipped with scikit-learn, no download) read row by row:
each image is a sequence of 8 steps of 8 features. A one-layer recurrent
network reads the rows and a linear layer classifies its last hidden state.
The same model is trained with rnnfast.LSTM, rnnfast.LayerNormLSTM and
torch.nn.LSTM (same seed, data order and optimiser); the script prints the
test accuracy and training time per epoch of each, and the test accuracy of
the trained model quantized to int8 (rnnfast.quantize_dynamic), and saves a
plot of the loss curves.

    python examples/digits.py                  # 20 epochs
    python examples/digits.py --epochs 5 --out /tmp/digits.png
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

import rnnfast

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "digits_loss.png")

# The recurrent layers compared, by display name.
LAYERS: dict[str, type[nn.Module]] = {
    "rnnfast.LSTM": rnnfast.LSTM,
    "rnnfast.LayerNormLSTM": rnnfast.LayerNormLSTM,
    "torch.nn.LSTM": nn.LSTM,
}


@dataclass
class Digits:
    """Train and test split: images ``[N, 8, 8]`` (rows as time steps,
    pixel values scaled to [0, 1]) and labels ``[N]``."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def load_data(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """scikit-learn's digits, split stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [N, 8, 8]
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed,
        stratify=y.numpy())
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Digits(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


class SequenceClassifier(nn.Module):
    """A recurrent layer over the rows of an image, then a linear layer on
    its final hidden state."""

    def __init__(self, layer: type[nn.Module], input_size: int = 8, hidden_size: int = 64,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.rnn = layer(input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]`` of images ``[B, 8, 8]``."""
        _, (h_n, _) = self.rnn(x)
        return self.head(h_n[-1])


@dataclass
class Result:
    """One layer's run: mean training loss, test accuracy and training time
    (seconds) of every epoch."""

    name: str
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)
    int8_accuracy: float = float("nan")  # of the trained model, int8-quantized

    @property
    def accuracy(self) -> float:
        """Test accuracy after the last epoch."""
        return self.accuracies[-1]

    @property
    def time_per_epoch(self) -> float:
        """Median training time of an epoch, in seconds."""
        times = sorted(self.epoch_times)
        return times[len(times) // 2]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def train(name: str, layer: type[nn.Module], data: Digits, *, epochs: int = 20,
          hidden_size: int = 64, batch_size: int = 64, lr: float = 2e-2,
          seed: int = 0) -> Result:
    """Trains a :class:`SequenceClassifier` on ``layer`` with Adam (learning
    rate ``lr`` decayed to 0 on a cosine over the epochs) on the
    cross-entropy, evaluating on the test split after every epoch."""
    torch.manual_seed(seed)
    model = SequenceClassifier(layer, data.train_x.shape[-1], hidden_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # Cosine decay to 0 over the run: a short run ends as settled as a long one.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(seed)
    result = Result(name)
    n = len(data.train_y)
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        total = 0.0
        for idx in torch.randperm(n, generator=order).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(data.train_x[idx]), data.train_y[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        schedule.step()
        result.epoch_times.append(time.perf_counter() - start)
        result.losses.append(total / n)
        result.accuracies.append(evaluate(model, data.test_x, data.test_y))
    result.int8_accuracy = evaluate(rnnfast.quantize_dynamic(model), data.test_x, data.test_y)
    return result


def plot(results: Sequence[Result], path: str) -> None:
    """Training loss and test accuracy per epoch of every run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = range(1, len(r.losses) + 1)
        ax_loss.plot(epochs, r.losses, marker=".", label=r.name)
        ax_acc.plot(epochs, [100 * a for a in r.accuracies], marker=".", label=r.name)
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log",
                title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("Digits (8 rows of 8 pixels) sequence classification")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: Sequence[Result]) -> None:
    """Accuracy and time per epoch of every run, with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Digits, {len(results[0].losses)} epochs, "
                        f"{torch.get_num_threads()} CPU thread(s)")
    table.add_column("layer", no_wrap=True, min_width=21)
    table.add_column("test accuracy", justify="right")
    table.add_column("int8", justify="right")
    table.add_column("final loss", justify="right")
    table.add_column("time / epoch (median)", justify="right")
    for r in results:
        table.add_row(r.name, f"{100 * r.accuracy:.1f}%", f"{100 * r.int8_accuracy:.1f}%",
                      f"{r.losses[-1]:.4f}",
                      f"{1000 * r.time_per_epoch:.0f} ms")
    Console().print(table)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line: see ``--help``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20,
                        help="training epochs (a few for a quick run); default 20")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-2, help="Adam learning rate; default 0.02")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS),
                        help="which recurrent layers to train (default: all)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"where to save the loss plot (PNG); default {DEFAULT_OUT}")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[Result]:
    """Trains every layer asked for, prints the table, saves the plot, and
    returns the results."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_data(seed=args.seed)
    results = [train(name, LAYERS[name], data, epochs=args.epochs,
                     hidden_size=args.hidden_size, batch_size=args.batch_size,
                     lr=args.lr, seed=args.seed)
               for name in args.layers]
    print_table(results)
    if not args.no_plot:
        plot(results, args.out)
        print(f"loss curves: {args.out}")
    return results


if __name__ == "__main__":
    main()
