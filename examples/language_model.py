"""A character-level LSTM language model with rnnfast, trained with truncated BPTT.

The canonical LSTM workload, as PyTorch's word-language-model example does
it: the text is cut into ``--batch-size`` parallel streams, read in chunks
of ``--bptt`` steps; the recurrent state is carried from chunk to chunk and
detached between them (truncated backpropagation through time); gradients
are clipped; dropout sits between the recurrent layers and around them.

The corpus is on every machine with Python and needs no download: the
source of Python's own standard library (the ``*.py`` files at the top of
``sysconfig.get_paths()["stdlib"]``, in name order, cut at ``--chars``
characters), split 90/5/5 into training, validation and test text.

For each ``--rnn`` (``lstm``: torch.nn.LSTM, ``rnnfast``: rnnfast.LSTM,
``rnnfast-ln``: rnnfast.LayerNormLSTM, ``rnnfast-reg``: rnnfast.LSTM with
zoneout, DropConnect on W_hh and variational dropout) the script trains the
same model (same seed and data), prints the perplexity and time of every
epoch, then, as a user shipping the model would:

1. saves the whole model with ``torch.save`` and reloads it with
   ``torch.load`` (its default ``weights_only=True``, the user allowlisting
   only their own classes), and scores the test text with the reloaded model;
2. exports it with ``torch.onnx.export`` and scores the test text with
   onnxruntime.

``--plot PATH`` saves the validation perplexity of every run against
training time.

    python examples/language_model.py                       # the three, a few minutes each
    python examples/language_model.py --rnn rnnfast --epochs 1 --chars 200000
    python examples/language_model.py --rnn rnnfast rnnfast-reg  # with / without regularisation
"""

from __future__ import annotations

import argparse
import functools
import glob
import math
import os
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

import rnnfast

# rnnfast-reg: rnnfast.LSTM with AWD-LSTM-style recurrent regularisation
# (issue 15), what nn.LSTM cannot do: variational dropout between the
# layers, DropConnect on W_hh and zoneout (Krueger et al. 2016's
# character-level rates: little on h, more on c).
REGULARISERS = dict(zoneout_hidden=0.05, zoneout_cell=0.25, weight_dropout=0.2,
                    variational_dropout=True)
RNNS: dict[str, Callable[..., nn.Module]] = {
    "lstm": nn.LSTM,
    "rnnfast": rnnfast.LSTM,
    "rnnfast-ln": rnnfast.LayerNormLSTM,
    "rnnfast-reg": functools.partial(rnnfast.LSTM, **REGULARISERS),
}
NAMES = {"lstm": "torch.nn.LSTM", "rnnfast": "rnnfast.LSTM",
         "rnnfast-ln": "rnnfast.LayerNormLSTM",
         "rnnfast-reg": "rnnfast.LSTM + zoneout, DropConnect, variational dropout"}
DEFAULT_RNNS = ["lstm", "rnnfast", "rnnfast-ln"]

_State = tuple[Tensor, Tensor]


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
@dataclass
class Corpus:
    """The text as character ids, split into training, validation and test
    ``[N]`` int64 tensors, and the characters (``vocab[id]``)."""

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab: list[str]


def stdlib_text(chars: int) -> str:
    """The first ``chars`` characters of the standard library's top-level
    ``*.py`` files, in name order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    text = "".join(parts)[:chars]
    if len(text) < chars:
        raise RuntimeError(f"only {len(text)} characters of Python source under {stdlib}, "
                           f"asked for {chars}")
    return text


def load_corpus(chars: int) -> Corpus:
    """The standard-library text as character ids, split 90/5/5."""
    text = stdlib_text(chars)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    n_train, n_valid = int(0.9 * len(ids)), int(0.05 * len(ids))
    return Corpus(ids[:n_train], ids[n_train:n_train + n_valid], ids[n_train + n_valid:],
                  vocab)


def batchify(ids: Tensor, streams: int) -> Tensor:
    """``[N]`` -> ``[N // streams, streams]``: ``streams`` contiguous pieces
    of the text side by side, time-major (the tail that does not fill a row
    is dropped)."""
    steps = ids.numel() // streams
    return ids[:steps * streams].view(streams, steps).t().contiguous()


def chunks(data: Tensor, bptt: int, full_only: bool = False):
    """``(inputs, targets)`` chunks of ``data`` ``[T, B]``: ``inputs`` ``[t, B]``
    with ``t <= bptt`` and ``targets`` the next characters ``[t, B]``."""
    for i in range(0, data.size(0) - 1, bptt):
        t = min(bptt, data.size(0) - 1 - i)
        if full_only and t < bptt:
            return
        yield data[i:i + t], data[i + 1:i + 1 + t]


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
class CharLM(nn.Module):
    """Embedding -> dropout -> a multi-layer recurrent network (dropout
    between its layers) -> dropout -> linear layer to next-character logits."""

    def __init__(self, rnn: Callable[..., nn.Module], vocab: int, embedding: int = 64,
                 hidden: int = 128, layers: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.drop = nn.Dropout(dropout)
        self.rnn = rnn(embedding, hidden, num_layers=layers, dropout=dropout)
        self.head = nn.Linear(hidden, vocab)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor, state: Optional[_State] = None
                ) -> tuple[Tensor, _State]:
        """Logits ``[T, B, vocab]`` of the characters after ``tokens``
        ``[T, B]``, and the recurrent state after the last step."""
        out, state = self.rnn(self.drop(self.embed(tokens)), state)
        return self.head(self.drop(out)), state


def detach(state: Optional[_State]) -> Optional[_State]:
    """The state without its history: truncated BPTT's cut between chunks."""
    return None if state is None else (state[0].detach(), state[1].detach())


# ---------------------------------------------------------------------------
# Training and scoring
# ---------------------------------------------------------------------------
# step(inputs [t, B], state or None) -> (logits [t, B, V], state)
Step = Callable[[Tensor, Optional[_State]], tuple[Tensor, _State]]


def perplexity(step: Step, data: Tensor, bptt: int, full_only: bool = False) -> float:
    """exp of the mean cross-entropy per character of ``data`` ``[T, B]``,
    read in chunks of ``bptt`` with the state carried across them."""
    total, count, state = 0.0, 0, None
    for inputs, targets in chunks(data, bptt, full_only):
        logits, state = step(inputs, state)
        total += nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return math.exp(total / count)


def torch_step(model: nn.Module) -> Step:
    def step(inputs, state):
        with torch.no_grad():
            return model(inputs, state)
    return step


@dataclass
class Run:
    """One ``--rnn``'s results: per epoch the training and validation
    perplexity, training time (wall clock, and the process's CPU time: on a
    shared machine the latter is what the model cost) and cumulative
    training time (seconds); then
    the test perplexity of the trained model, of its int8-quantized copy
    (rnnfast.quantize_dynamic), of the model reloaded with torch.load, and, over the test chunks of full length, of PyTorch and of
    the ONNX export in onnxruntime (NaN if a stage did not run)."""

    rnn: str
    train_ppl: list[float] = field(default_factory=list)
    valid_ppl: list[float] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)
    epoch_cpu_times: list[float] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)
    test_ppl: float = math.nan
    int8_test_ppl: float = math.nan
    reloaded_test_ppl: float = math.nan
    full_chunks_test_ppl: float = math.nan
    onnx_test_ppl: float = math.nan
    onnx_error: str = ""

    @property
    def name(self) -> str:
        return NAMES[self.rnn]

    @property
    def time_per_epoch(self) -> float:
        """Median training time of an epoch, in seconds."""
        return _median(self.epoch_times)

    @property
    def cpu_time_per_epoch(self) -> float:
        """Median CPU time of an epoch's training, in seconds."""
        return _median(self.epoch_cpu_times)


def _median(values: Sequence[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


@dataclass
class Config:
    chars: int = 1_000_000
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 8
    bptt: int = 64
    embedding: int = 64
    hidden: int = 128
    layers: int = 2
    dropout: float = 0.2
    lr: float = 3e-3
    clip: float = 1.0
    seed: int = 0


def train(rnn: str, corpus: Corpus, cfg: Config, log: Callable[[str], None] = print
          ) -> tuple[CharLM, Run]:
    """Trains a :class:`CharLM` on ``rnn`` with Adam and truncated BPTT,
    evaluating on the validation text after every epoch."""
    torch.manual_seed(cfg.seed)
    model = CharLM(RNNS[rnn], len(corpus.vocab), cfg.embedding, cfg.hidden, cfg.layers,
                   cfg.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_data = batchify(corpus.train, cfg.batch_size)
    valid_data = batchify(corpus.valid, cfg.eval_batch_size)
    run = Run(rnn)
    elapsed = 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start, start_cpu = time.perf_counter(), time.process_time()
        total, count, state = 0.0, 0, None
        for inputs, targets in chunks(train_data, cfg.bptt):
            state = detach(state)
            logits, state = model(inputs, state)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                               targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            total += loss.item() * targets.numel()
            count += targets.numel()
        seconds = time.perf_counter() - start
        run.epoch_cpu_times.append(time.process_time() - start_cpu)
        elapsed += seconds
        model.eval()
        run.train_ppl.append(math.exp(total / count))
        run.valid_ppl.append(perplexity(torch_step(model), valid_data, cfg.bptt))
        run.epoch_times.append(seconds)
        run.elapsed.append(elapsed)
        log(f"{run.name:>21} | epoch {epoch} | {seconds:6.1f} s "
            f"({run.epoch_cpu_times[-1]:6.1f} s CPU) | train ppl {run.train_ppl[-1]:6.3f} | "
            f"valid ppl {run.valid_ppl[-1]:6.3f}")
    test_data = batchify(corpus.test, cfg.eval_batch_size)
    run.test_ppl = perplexity(torch_step(model), test_data, cfg.bptt)
    run.int8_test_ppl = perplexity(torch_step(rnnfast.quantize_dynamic(model).eval()),
                                   test_data, cfg.bptt)
    return model, run


def save_and_reload(model: CharLM, path: str) -> CharLM:
    """``torch.save`` of the whole model, then ``torch.load`` with its default
    ``weights_only=True``: the user allowlists their own classes and torch's
    (nn.LSTM included); rnnfast allowlists its layers when imported."""
    torch.save(model, path)
    with torch.serialization.safe_globals([CharLM, nn.Embedding, nn.Dropout, nn.Linear,
                                           nn.LSTM]):
        return torch.load(path)


def export_onnx(model: CharLM, path: str, bptt: int, batch: int) -> None:
    """``torch.onnx.export`` (the default, torch.export-based exporter) of
    ``model(tokens [bptt, B], (h_0, c_0)) -> (logits, (h_n, c_n))`` with a
    dynamic batch. The time length stays the example's: torch 2.14's exporter
    bakes it into nn.LSTM's graph (a Reshape to it), so the exported model is
    scored over chunks of exactly ``bptt`` steps."""
    model.eval()
    rnn = model.rnn
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    tokens = torch.zeros(bptt, batch, dtype=torch.int64)
    state = (torch.zeros(layers, batch, rnn.hidden_size),
             torch.zeros(layers, batch, rnn.hidden_size))
    dynamic = torch.export.Dim.DYNAMIC
    torch.onnx.export(model, (tokens, state), path, dynamo=True,
                      input_names=["tokens", "h_0", "c_0"],
                      output_names=["logits", "h_n", "c_n"],
                      dynamic_shapes=({1: dynamic}, ({1: dynamic}, {1: dynamic})))


def onnx_step(path: str, model: CharLM) -> Step:
    """Scores with onnxruntime, the state carried as the PyTorch model's."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    rnn = model.rnn
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)

    def step(inputs, state):
        if state is None:
            zeros = np.zeros((layers, inputs.size(1), rnn.hidden_size), dtype=np.float32)
            state = (zeros, zeros)
        logits, h, c = session.run(None, {"tokens": inputs.numpy(), "h_0": state[0],
                                          "c_0": state[1]})
        return torch.from_numpy(logits), (h, c)
    return step


def ship(model: CharLM, run: Run, corpus: Corpus, cfg: Config, workdir: str,
         onnx: bool = True) -> Run:
    """The two stages after training: torch.save / torch.load, and ONNX
    export scored in onnxruntime (an export error is recorded in the run)."""
    test_data = batchify(corpus.test, cfg.eval_batch_size)
    reloaded = save_and_reload(model, os.path.join(workdir, f"{run.rnn}.pt")).eval()
    run.reloaded_test_ppl = perplexity(torch_step(reloaded), test_data, cfg.bptt)
    if onnx:
        run.full_chunks_test_ppl = perplexity(torch_step(model), test_data, cfg.bptt,
                                              full_only=True)
        path = os.path.join(workdir, f"{run.rnn}.onnx")
        try:
            export_onnx(model, path, cfg.bptt, cfg.eval_batch_size)
            run.onnx_test_ppl = perplexity(onnx_step(path, model), test_data, cfg.bptt,
                                           full_only=True)
        except Exception as e:  # noqa: BLE001 (reported, and the other runs go on)
            run.onnx_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return run


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def plot(runs: Sequence[Run], path: str) -> None:
    """Validation perplexity of every run against its training time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot(r.elapsed, r.valid_ppl, marker="o", label=r.name)
    ax.set(xlabel="training time (s, wall clock)", ylabel="validation perplexity (per character)",
           title="Character-level LM on Python's standard library")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(runs: Sequence[Run], cfg: Config) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Char LM, {cfg.chars} characters, {cfg.epochs} epoch(s), "
                        f"{cfg.layers}x{cfg.hidden} hidden, {torch.get_num_threads()} "
                        f"CPU thread(s)")
    for col in ("rnn", "valid ppl", "test ppl", "int8 test ppl", "reloaded test ppl",
                "test ppl, full chunks", "ONNX (onnxruntime)", "time / epoch",
                "CPU time / epoch"):
        if col == "rnn":
            table.add_column(col, no_wrap=True, min_width=21)
        else:
            table.add_column(col, justify="right")
    def fmt(value: float, digits: int = 3) -> str:
        return "-" if math.isnan(value) else f"{value:.{digits}f}"

    for r in runs:
        table.add_row(r.name, fmt(r.valid_ppl[-1]), fmt(r.test_ppl), fmt(r.int8_test_ppl),
                      fmt(r.reloaded_test_ppl), fmt(r.full_chunks_test_ppl, 4),
                      fmt(r.onnx_test_ppl, 4) if not r.onnx_error else "export failed",
                      f"{r.time_per_epoch:.1f} s", f"{r.cpu_time_per_epoch:.1f} s")
    Console(width=140).print(table)
    for r in runs:
        if r.onnx_error:
            print(f"{r.name}: ONNX export failed: {r.onnx_error}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    d = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rnn", nargs="+", choices=list(RNNS), default=DEFAULT_RNNS,
                        help="recurrent layer(s) to train: lstm (torch.nn.LSTM), rnnfast "
                             "(rnnfast.LSTM), rnnfast-ln (rnnfast.LayerNormLSTM), "
                             "rnnfast-reg (rnnfast.LSTM with zoneout, DropConnect and "
                             "variational dropout); default the first three")
    parser.add_argument("--chars", type=int, default=d.chars,
                        help=f"characters of standard-library source to use; default {d.chars}")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    parser.add_argument("--bptt", type=int, default=d.bptt, help="truncated-BPTT chunk length")
    parser.add_argument("--embedding", type=int, default=d.embedding)
    parser.add_argument("--hidden", type=int, default=d.hidden)
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--dropout", type=float, default=d.dropout)
    parser.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    parser.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clipping")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX stage")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="save validation perplexity against training time as a PNG")
    parser.add_argument("--workdir", default=None,
                        help="where the saved and exported models go (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[Run]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = Config(chars=args.chars, epochs=args.epochs, batch_size=args.batch_size,
                 eval_batch_size=args.eval_batch_size, bptt=args.bptt,
                 embedding=args.embedding, hidden=args.hidden, layers=args.layers,
                 dropout=args.dropout, lr=args.lr, clip=args.clip, seed=args.seed)
    corpus = load_corpus(cfg.chars)
    print(f"corpus: {cfg.chars} characters of Python's standard library, "
          f"{len(corpus.vocab)} distinct; train/valid/test {len(corpus.train)}/"
          f"{len(corpus.valid)}/{len(corpus.test)}")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        for rnn in args.rnn:
            model, run = train(rnn, corpus, cfg)
            runs.append(ship(model, run, corpus, cfg, workdir, onnx=not args.no_onnx))
    print_table(runs, cfg)
    if args.plot:
        plot(runs, args.plot)
        print(f"validation perplexity against time: {args.plot}")
    return runs


if __name__ == "__main__":
    main()
