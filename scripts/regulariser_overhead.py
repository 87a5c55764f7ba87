"""What the recurrent regularisers (issue 15) cost, measured side by side.

Training steps (forward + backward of ``output.sum()``) of one rnnfast.LSTM
layer at T=100 B=64 I=H=256 (the issue's shape), float32 on the CPU, with
each regulariser on against all off, the calls interleaved in one process
so that a shared machine's load hits both alike; medians and their ratios.
Then the alternative users write today, a Python loop over nn.LSTMCell with
zoneout, against rnnfast.LSTM with the same zoneout, at B=64 and B=4.

    python scripts/regulariser_overhead.py [--threads 2] [--repeats 15] [--cpu-time]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

import rnnfast


def lstm_cell_zoneout_loop(cell: nn.LSTMCell, x: torch.Tensor, z_h: float,
                           z_c: float) -> torch.Tensor:
    """Zoneout (Krueger et al. 2016) around nn.LSTMCell, as one writes it
    without rnnfast: a mask per step and unit, in a Python loop."""
    T, B, _ = x.shape
    h = x.new_zeros(B, cell.hidden_size)
    c = x.new_zeros(B, cell.hidden_size)
    outputs = []
    for t in range(T):
        h_new, c_new = cell(x[t], (h, c))
        m_h = torch.empty_like(h).bernoulli_(z_h)
        m_c = torch.empty_like(c).bernoulli_(z_c)
        h = m_h * h + (1 - m_h) * h_new
        c = m_c * c + (1 - m_c) * c_new
        outputs.append(h)
    return torch.stack(outputs)


CPU_TIME = False  # --cpu-time: the process's CPU time instead of wall clock


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each of ``fns``, called in turn ``repeats`` times
    (after one warm-up call each): wall clock, or with --cpu-time the
    process's CPU time (all its threads; on a machine shared with other
    jobs, what the call itself cost)."""
    clock = time.process_time if CPU_TIME else time.perf_counter
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(module, x):
    def step():
        module.zero_grad(set_to_none=True)
        out, _ = module(x)
        out.sum().backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the process's CPU time rather than wall clock")
    args = parser.parse_args()
    global CPU_TIME
    CPU_TIME = args.cpu_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, rnnfast kernels {rnnfast.build_info()['cpu_kernels']}, "
          f"{'process CPU time' if CPU_TIME else 'wall clock'}, load average "
          f"{os.getloadavg()[0]:.1f}")

    T, B, H = 100, 64, 256
    x = torch.randn(T, B, H)
    base = rnnfast.LSTM(H, H)
    variants = {
        "off": base,
        "zoneout h+c 0.1": rnnfast.LSTM(H, H, zoneout_hidden=0.1, zoneout_cell=0.1),
        "weight_dropout 0.5": rnnfast.LSTM(H, H, weight_dropout=0.5),
    }
    for m in variants.values():
        m.load_state_dict(base.state_dict())
    got = interleaved({k: train_step(m, x) for k, m in variants.items()}, args.repeats)
    print(f"\ntraining, T={T} B={B} I=H={H}, one layer (median ms, ratio to off):")
    for k, v in got.items():
        print(f"  {k:22s} {v * 1e3:8.1f} ms   {v / got['off']:.3f}x")

    two = {"dropout 0.3": rnnfast.LSTM(H, H, num_layers=2, dropout=0.3),
           "variational 0.3": rnnfast.LSTM(H, H, num_layers=2, dropout=0.3,
                                           variational_dropout=True)}
    two["variational 0.3"].load_state_dict(two["dropout 0.3"].state_dict())
    got = interleaved({k: train_step(m, x) for k, m in two.items()}, args.repeats)
    print(f"\ntraining, T={T} B={B} I=H={H}, two layers (median ms, ratio):")
    for k, v in got.items():
        print(f"  {k:22s} {v * 1e3:8.1f} ms   {v / got['dropout 0.3']:.3f}x")

    print("\nzoneout h+c 0.1, training: a Python loop over nn.LSTMCell vs rnnfast.LSTM")
    for batch in (64, 4):
        xb = torch.randn(T, batch, H)
        cell = nn.LSTMCell(H, H)
        ours = rnnfast.LSTM(H, H, zoneout_hidden=0.1, zoneout_cell=0.1)

        def loop_step():
            cell.zero_grad(set_to_none=True)
            lstm_cell_zoneout_loop(cell, xb, 0.1, 0.1).sum().backward()

        got = interleaved({"LSTMCell loop": loop_step, "rnnfast": train_step(ours, xb)},
                          args.repeats)
        print(f"  B={batch:3d}: loop {got['LSTMCell loop'] * 1e3:8.1f} ms, rnnfast "
              f"{got['rnnfast'] * 1e3:8.1f} ms: {got['LSTMCell loop'] / got['rnnfast']:.1f}x")


if __name__ == "__main__":
    main()
