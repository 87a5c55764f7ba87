"""Where the time of one streaming-decode call goes (issue 13): a 2-layer
rnnfast.LSTM stepping one timestep per call with its state carried, timed
layer by layer down the call stack, so each layer's own cost is the
difference from the one below it:

  module      model(x, state): nn.Module.__call__, argument checks, the
              zero-size handling, functional.lstm, the ops, torch.stack
  forward     model.forward(x, state): without nn.Module.__call__
  functional  rnnfast.functional.lstm(x, state, weights, ...): without the
              module's checks and _flat_weights
  stacked     ops.stacked_inference, what functional runs for a call that
              needs no gradient: the whole network as one op, its layers
              called from C++
  ops         ops.lstm_forward per layer from Python and torch.stack of the
              states: the general route's op calls (for comparison)
  dispatcher  torch.ops.rnnfast.lstm_forward.default per layer: the
              dispatcher, the C++ checks, allocation and the kernel
  gemm        the recurrent and input GEMMs alone (torch.mm into
              preallocated outputs, 2 per layer): what no fused step avoids
  nn.LSTM     torch.nn.LSTM on the same step, for comparison

Then a cProfile of the module call (Python functions by own time) and a
torch.profiler table of the ATen/custom ops one call runs.

Every row runs under torch.inference_mode (the benchmark's setting), or
with ``--under no_grad`` under torch.no_grad, the usual way to evaluate, where
autograd's dispatch key stays on.

    PYTHONPATH=. python scripts/decode_overhead.py [--B 1] [--H 256] [--threads 1]
                                                   [--under inference_mode|no_grad]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time

import torch

import rnnfast
from rnnfast import functional as RF
from rnnfast import ops


def per_call_us(fn, min_s: float = 0.3, blocks: int = 15) -> tuple[float, float, float]:
    """Median, IQR and minimum of the per-call time in microseconds, over
    blocks of calls each lasting about min_s / blocks (on a shared machine
    the minimum is the least disturbed block)."""
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(20):
        fn()
    one = (time.perf_counter() - start) / 20
    number = max(1, int(min_s / blocks / max(one, 1e-7)))
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number * 1e6)
    q1, med, q3 = statistics.quantiles(times, n=4)
    return med, q3 - q1, min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--under", choices=["inference_mode", "no_grad"], default="inference_mode",
                   help="the grad mode every row runs in")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--min-s", type=float, default=0.3, help="seconds of timing per row")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, H, L = args.B, args.H, args.layers
    mode = torch.inference_mode if args.under == "inference_mode" else torch.no_grad
    model = rnnfast.LSTM(H, H, num_layers=L).eval()
    ref = torch.nn.LSTM(H, H, num_layers=L).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(1, B, H)
    state = (torch.randn(L, B, H), torch.randn(L, B, H))
    weights = model._flat_weights
    per_layer = RF.split_weights(weights, L, False, True)
    w_t = [(w_ih.t(), w_hh.t()) for w_ih, w_hh, *_ in per_layer]
    gates = torch.empty(B, 4 * H)

    def module():
        model(x, state)

    def forward():
        model.forward(x, state)

    def functional():
        RF.lstm(x, state, weights, num_layers=L)

    def stacked():
        ops.stacked_inference(x, state[0], state[1], weights, L, False, False, None, True,
                              False, 0.0, 0.0, 0.0)

    def op_wrappers():
        inp, hs, cs = x, [], []
        for i, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(per_layer):
            inp, h, c, *_ = ops.lstm_forward(inp, state[0][i], state[1][i], w_ih, w_hh,
                                               b_ih, b_hh, w_hr, None, False, False)
            hs.append(h)
            cs.append(c)
        torch.stack(hs), torch.stack(cs)

    raw = torch.ops.rnnfast.lstm_forward.default

    def dispatcher():
        inp = x
        for i, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(per_layer):
            inp = raw(inp, state[0][i], state[1][i], w_ih, w_hh, b_ih, b_hh, w_hr, None,
                      False, False)[0]

    def gemm():
        for i, (wi, wh) in enumerate(w_t):
            torch.mm(x[0], wi, out=gates)
            torch.mm(state[0][i], wh, out=gates)

    def nn_lstm():
        ref(x, state)

    rows = []
    with mode():
        for name, fn in (("module", module), ("forward", forward), ("functional", functional),
                         ("stacked", stacked), ("ops", op_wrappers), ("dispatcher", dispatcher),
                         ("gemm", gemm), ("nn.LSTM", nn_lstm)):
            rows.append((name, *per_call_us(fn, args.min_s)))
    print(f"streaming decode, {L} layers, B={B} I=H={H}, float32, {args.threads} thread(s), under {args.under}, "
          f"torch {torch.__version__}, rnnfast {rnnfast.build_info()}")
    print(f"{'layer':<11} {'median us':>9} {'IQR':>6} {'min us':>7} {'own (min)':>9}")
    # "own": a row's minimum less the next row's down the call stack (ops is
    # beside the stack, not below it: the stacked row's own is against
    # dispatcher).
    stack = [r for r in rows if r[0] not in ("ops", "gemm", "nn.LSTM")]
    for name, med, iqr, low in rows:
        names = [r[0] for r in stack]
        own = ""
        if name in names and names.index(name) + 1 < len(stack):
            own = f"{low - stack[names.index(name) + 1][3]:9.1f}"
        print(f"{name:<11} {med:9.1f} {iqr:6.1f} {low:7.1f} {own}")

    # What the op does per call besides its one step, timed through torch
    # equivalents (the same MKL pack, the same ATen calls), per layer:
    w_hh = per_layer[0][1]
    b_ih, b_hh = per_layer[0][2], per_layer[0][3]
    h0 = state[0][0]
    proxies = [
        ("pack W_hh (cblas_sgemm_pack, as StepWeight)",
         (lambda: torch.ops.mkl._mkl_reorder_linear_weight(w_hh, B))
         if torch._C.has_mkl else None),
        ("b_ih + b_hh", lambda: b_ih + b_hh),
        ("x W_ih^T + b (addmm)", lambda: torch.addmm(b_ih, x[0], w_t[0][0])),
        ("h W_hh^T (mm, unpacked)", lambda: torch.mm(h0, w_t[0][1])),
        ("clone of h or c", lambda: h0.clone()),
        ("empty [0, 4H] (unused gates)", lambda: torch.empty(0, 4 * H)),
        ("torch.stack of the layers' h", lambda: torch.stack([h0, h0])),
        ("empty op call (aten::alias)", lambda: torch.ops.aten.alias.default(h0)),
    ]
    print(f"\nper layer, inside the op (the same work through torch; us/call, {args.threads} "
          f"thread(s)):")
    with mode():
        for name, fn in proxies:
            if fn is None:
                print(f"  {name:<46} (no MKL)")
                continue
            med, iqr, low = per_call_us(fn, args.min_s)
            print(f"  {name:<46} median {med:7.1f} (IQR {iqr:.1f}), min {low:7.1f}")
    if args.no_profile:
        return 0
    with mode():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            model(x, state)
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    print("\ncProfile of 2000 module calls (own time per function; profiling inflates it):")
    print("\n".join(out.getvalue().splitlines()[4:]))
    from torch.profiler import ProfilerActivity, profile
    with mode(), profile(activities=[ProfilerActivity.CPU]) as tp:
        for _ in range(200):
            model(x, state)
    print("torch.profiler, 200 module calls:")
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
