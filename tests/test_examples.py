"""The examples run and do what they say: a short run of examples/digits.py
(scikit-learn's bundled digits, no download) reaches at least 90% test
accuracy with both rnnfast layers and saves its plot."""

from __future__ import annotations

import importlib.util
import os
import sys

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
