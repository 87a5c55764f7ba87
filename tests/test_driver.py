"""The shared time loop (csrc/lstm_driver.h, csrc/layer_norm_lstm_driver.h)
on the layouts that pick its different paths, on every device:

- every step's GEMM reads h_{t-1} where the previous step wrote it, and a
  reverse layer over a PackedSequence gains rows as it goes, so some steps
  read part of h_{t-1} from the initial state;
- the W_hh gradient reads h_{t-1} in place for a uniform layout (a padded
  input, or a PackedSequence of equal lengths) and gathers it otherwise;
- the final hidden state is collected from the last step of every sequence;
- the LayerNorm-LSTM backward works in blocks of rows on the CPU (several
  blocks here) and in one block on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from utils import (TOLERANCES, assert_results_close, forward_backward,
                   make_layer_norm_lstm_pair, make_lstm_pair)

LAYOUTS = {
    "padded": None,
    "packed_equal_lengths": [5, 5, 5, 5],
    "packed_growing_in_reverse": [5, 4, 4, 2],
}


@pytest.mark.parametrize("lengths", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("proj", [0, 2], ids=["no_proj", "proj"])
def test_lstm_layouts_match_nn_lstm(device, lengths, proj):
    ours, ref = make_lstm_pair(3, 4, proj_size=proj, bidirectional=True, num_layers=2,
                               device=device)
    x = torch.randn(5, 4, 3, dtype=torch.float64, device=device)
    out = proj or 4
    hx = (torch.randn(4, 4, out, dtype=torch.float64, device=device),
          torch.randn(4, 4, 4, dtype=torch.float64, device=device))
    got = forward_backward(ours, x, hx, lengths=lengths)
    expected = forward_backward(ref, x, hx, lengths=lengths)
    assert_results_close(got, expected, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("lengths", [None, sorted([40] + [37, 40, 3, 21, 40, 8] * 5,
                                                  reverse=True)],
                         ids=["padded", "packed"])
def test_layer_norm_lstm_over_several_blocks_matches_reference(device, lengths,
                                                               monkeypatch):
    """40 steps of up to 31 rows: over 1024 rows, so the CPU backward runs
    several blocks of 256 rows (RNNFAST_CPU_GRAD_BLOCK_ROWS) and many
    LayerNorm parameter-gradient groups."""
    monkeypatch.setenv("RNNFAST_CPU_GRAD_BLOCK_ROWS", "256")
    ours, ref = make_layer_norm_lstm_pair(3, 5, bidirectional=True, device=device)
    x = torch.randn(40, 31, 3, dtype=torch.float64, device=device)
    hx = (torch.randn(2, 31, 5, dtype=torch.float64, device=device),
          torch.randn(2, 31, 5, dtype=torch.float64, device=device))
    got = forward_backward(ours, x, hx, lengths=lengths)
    expected = forward_backward(ref, x, hx, lengths=lengths)
    assert_results_close(got, expected, scaled=True, **TOLERANCES[torch.float64])
