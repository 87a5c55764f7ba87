"""A small forward + backward of every rnnfast layer on CUDA, for
compute-sanitizer (scripts/gpu_check.py runs it under memcheck, racecheck,
synccheck and initcheck).

Covers padded and packed (unsorted) input, batch_first, both directions, two
layers, a projection and each dtype family (bfloat16 with packed input and
with a projection too), zoneout, DropConnect and variational dropout, on shapes small enough that the sanitizer finishes
in seconds, for rnnfast.LSTM and rnnfast.LayerNormLSTM (which skips the
cases with a projection). The hidden sizes cover every path of the
LayerNorm row reductions: 6 (a row within one warp, eight rows to a block),
40 and 70 (rows spanning two or three warps, several rows to a block, summed
through shared memory; rows of 4H up to nine warps) and 600 (rows of H and
4H past 480, several passes per thread). On a Hopper (132 SMs) a step of
fewer rows than SMs spreads each row over a thread-block cluster (launch.cuh,
row_groups): B = 3 at H = 600 runs clusters of four blocks summed through
distributed shared memory, and the case of B = 160 padded rows runs the
other large-row path, one block of the 512-thread maximum per row.
Exits non-zero on any error; the sanitizer adds its own exit code for memory
errors. ``--device cpu`` runs the same cases on the CPU (a check of the case
list itself).

    PYTHONPATH=. PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool memcheck python scripts/sanitize_case.py
"""

import argparse
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfast

T, B, I, H, P = 5, 3, 4, 6, 2
LENGTHS = torch.tensor([3, 5, 1])

CASES = [
    dict(dtype=torch.float32),
    dict(dtype=torch.float32, num_layers=2, bidirectional=True, proj_size=P),
    dict(dtype=torch.float32, packed=True, bidirectional=True),
    dict(dtype=torch.float32, packed=True, proj_size=P, bias=False),
    dict(dtype=torch.float64, batch_first=True, proj_size=P),
    dict(dtype=torch.bfloat16, num_layers=2, bidirectional=True),
    dict(dtype=torch.float16, packed=True, proj_size=P),
    dict(dtype=torch.float32, packed=True, bidirectional=True, hidden_size=70),
    dict(dtype=torch.float64, batch_first=True, bias=False, num_layers=2, hidden_size=40),
    # the LayerNorm's 512-thread path (H >= 481): packed, both directions, and bfloat16
    dict(dtype=torch.float32, packed=True, bidirectional=True, hidden_size=600),
    dict(dtype=torch.bfloat16, num_layers=2, hidden_size=600),
    # ... and with more rows than a Hopper has SMs: one 512-thread block per
    # row, no cluster (the path of every GPU before Hopper)
    dict(dtype=torch.float32, hidden_size=600, batch=160, steps=2),
    dict(dtype=torch.bfloat16, packed=True, proj_size=P),
    # the regularisers: zoneout's step kernels (ZoneoutCell) and hidden-state
    # kernels, with masks in training and rates in evaluation, DropConnect
    # and variational dropout; half types with a projection and packed rows
    dict(dtype=torch.float32, packed=True, bidirectional=True, num_layers=2, dropout=0.3,
         zoneout_hidden=0.2, zoneout_cell=0.3, weight_dropout=0.2, variational_dropout=True),
    dict(dtype=torch.bfloat16, packed=True, proj_size=P, zoneout_hidden=0.2,
         zoneout_cell=0.3),
    dict(dtype=torch.float16, bidirectional=True, hidden_size=40, zoneout_hidden=0.2,
         zoneout_cell=0.3),
]


def constructor_kwargs(case):
    """The keyword arguments of the layer's constructor in a case."""
    return {k: v for k, v in case.items()
            if k not in ("dtype", "packed", "hidden_size", "batch", "steps")}


def layer_classes():
    """rnnfast's recurrent layers: LSTM, and any other that is exported."""
    for name in ("LSTM", "LayerNormLSTM"):
        if hasattr(rnnfast, name):
            yield name, getattr(rnnfast, name)


def run_case(cls, case, device="cuda"):
    case = dict(case)
    dtype = case.pop("dtype")
    packed = case.pop("packed", False)
    hidden = case.pop("hidden_size", H)
    batch = case.pop("batch", B)
    steps = case.pop("steps", T)
    assert not packed or (batch, steps) == (B, T), "LENGTHS are for B x T"
    torch.manual_seed(0)
    model = cls(I, hidden, **case).to(device, dtype)
    batch_first = case.get("batch_first", False)
    x = torch.randn((batch, steps, I) if batch_first else (steps, batch, I), device=device,
                    dtype=dtype, requires_grad=True)
    inp = (pack_padded_sequence(x, LENGTHS, batch_first=batch_first, enforce_sorted=False)
           if packed else x)
    out, (h, c) = model(inp)
    out = out.data if packed else out
    (out.float().square().sum() + h.float().sum() + c.float().sum()).backward()
    with torch.no_grad():  # inference path: nothing saved
        model.eval()
        model(inp)
    if device == "cuda":
        torch.cuda.synchronize()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = parser.parse_args(argv).device
    if device == "cuda" and not torch.cuda.is_available():
        print("sanitize_case: CUDA is not available", file=sys.stderr)
        return 1
    failures = 0
    for name, cls in layer_classes():
        for case in CASES:
            label = f"{name} {case}"
            try:
                cls(I, case.get("hidden_size", H), **constructor_kwargs(case))
            except (TypeError, ValueError) as e:  # an option this layer lacks
                print(f"skip {label}: {e}")
                continue
            try:
                run_case(cls, case, device)
                print(f"ok   {label}")
            except Exception as e:  # report every case, then fail
                failures += 1
                print(f"FAIL {label}: {type(e).__name__}: {e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
