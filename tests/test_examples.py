"""The examples run and do what they say: a short run of examples/digits.py
(scikit-learn's bundled digits, no download) reaches at least 90% test
accuracy with both rnnfast layers and saves its plot."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example(name: str):
    """Imports examples/<name>.py (examples/ is not a package)."""
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"rnnfast_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_digits_short_run_accuracy(tmp_path, capsys):
    digits = _load_example("digits")
    out = tmp_path / "digits.png"
    threads = torch.get_num_threads()
    try:
        # One thread: the model is too small to gain from more, and a shared
        # machine's other load then costs the least.
        results = digits.main(["--epochs", "10", "--threads", "1", "--out", str(out),
                               "--layers", "rnnfast.LSTM", "rnnfast.LayerNormLSTM"])
    finally:
        torch.set_num_threads(threads)
    assert [r.name for r in results] == ["rnnfast.LSTM", "rnnfast.LayerNormLSTM"]
    for r in results:
        assert len(r.losses) == len(r.accuracies) == len(r.epoch_times) == 10
        assert r.accuracy >= 0.90, f"{r.name}: test accuracy {r.accuracy:.3f}"
        assert r.losses[-1] < r.losses[0] / 5, f"{r.name}: loss {r.losses}"
        # the trained model quantized to int8 (rnnfast.quantize_dynamic)
        assert abs(r.int8_accuracy - r.accuracy) <= 0.005, (r.name, r.int8_accuracy, r.accuracy)
    printed = capsys.readouterr().out
    assert "rnnfast.LayerNormLSTM" in printed and "%" in printed
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_digits_data_is_rows_of_pixels():
    """Each image is 8 steps of 8 features in [0, 1], all 10 classes in
    both splits, which together hold all 1797 images."""
    digits = _load_example("digits")
    data = digits.load_data()
    assert data.train_x.shape[1:] == data.test_x.shape[1:] == (8, 8)
    assert len(data.train_y) + len(data.test_y) == 1797
    assert 0 <= data.train_x.min() and data.train_x.max() <= 1
    assert set(data.train_y.tolist()) == set(data.test_y.tolist()) == set(range(10))


# examples/language_model.py: a character-level LM trained with truncated BPTT
# on Python's standard-library source, tiny (a few seconds per layer).
_LM_ARGS = ["--chars", "30000", "--epochs", "2", "--hidden", "32", "--embedding", "16",
            "--batch-size", "8", "--eval-batch-size", "4", "--bptt", "24", "--lr", "1e-2",
            "--threads", "1"]
_LM_RNNS = ["lstm", "rnnfast", "rnnfast-ln"]


@pytest.fixture(scope="module")
def language_model_runs(tmp_path_factory):
    """One short run of the script's main() for the three layers, with the
    plot; returns ``(runs by --rnn, printed output, plot path)``."""
    lm = _load_example("language_model")
    out = tmp_path_factory.mktemp("language_model")
    plot = out / "valid_ppl.png"
    threads = torch.get_num_threads()
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            runs = lm.main([*_LM_ARGS, "--rnn", *_LM_RNNS, "--plot", str(plot),
                            "--workdir", str(out)])
    finally:
        torch.set_num_threads(threads)
    return {r.rnn: r for r in runs}, buffer.getvalue(), plot


def test_language_model_with_regularisers_trains_and_ships(tmp_path):
    """--rnn rnnfast-reg (zoneout, DropConnect, variational dropout): learns,
    reloads, and exports to ONNX (zoneout's evaluation formula in a Scan),
    which onnxruntime scores as PyTorch does."""
    lm = _load_example("language_model")
    threads = torch.get_num_threads()
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            (run,) = lm.main([*_LM_ARGS, "--epochs", "1", "--rnn", "rnnfast-reg",
                              "--workdir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    vocab = len(lm.load_corpus(30000).vocab)
    assert run.valid_ppl[-1] < vocab / 2, run.valid_ppl
    assert run.reloaded_test_ppl == run.test_ppl
    pytest.importorskip("onnxruntime")  # the ONNX half (make test installs it)
    assert run.onnx_error == "", run.onnx_error
    assert run.onnx_test_ppl == pytest.approx(run.full_chunks_test_ppl, rel=1e-4)


@pytest.mark.parametrize("rnn", _LM_RNNS)
def test_language_model_learns_and_reloads(language_model_runs, rnn):
    runs, printed, plot = language_model_runs
    run = runs[rnn]
    vocab = len(_load_example("language_model").load_corpus(30000).vocab)
    assert len(run.valid_ppl) == len(run.train_ppl) == len(run.epoch_times) == 2
    assert len(run.epoch_cpu_times) == 2 and run.elapsed == sorted(run.elapsed)
    # perplexity falls, from below the vocabulary's (a uniform guess) onwards
    assert run.valid_ppl[1] < run.valid_ppl[0] < vocab, run.valid_ppl
    assert run.train_ppl[1] < run.train_ppl[0], run.train_ppl
    assert run.test_ppl < vocab / 2
    # the trained model quantized to int8 (rnnfast.quantize_dynamic)
    assert abs(run.int8_test_ppl / run.test_ppl - 1) <= 0.02, (run.int8_test_ppl, run.test_ppl)
    # torch.save / torch.load (weights_only=True) gives back the same model
    assert run.reloaded_test_ppl == run.test_ppl
    assert f"{run.name:>21} | epoch 2 |" in printed
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_language_model_rnnfast_trains_as_nn_lstm(language_model_runs):
    """Same seed, data and dropout stream: rnnfast.LSTM's run is nn.LSTM's
    up to float32 rounding, which two epochs of training amplify: 0.2% apart
    in validation perplexity with torch 2.11's kernels (one forward agrees to
    6e-8), under 0.1% with 2.13's and 2.14's."""
    runs, _, _ = language_model_runs
    for a, b in zip(runs["rnnfast"].valid_ppl, runs["lstm"].valid_ppl):
        assert a == pytest.approx(b, rel=5e-3)


@pytest.mark.parametrize("rnn", _LM_RNNS)
def test_language_model_onnx_scores_as_pytorch(language_model_runs, rnn):
    """The model exported with plain torch.onnx.export scores the test text
    in onnxruntime with PyTorch's perplexity."""
    pytest.importorskip("onnxruntime")
    run = language_model_runs[0][rnn]
    assert not run.onnx_error, run.onnx_error
    assert run.onnx_test_ppl == pytest.approx(run.full_chunks_test_ppl, rel=1e-4)
