"""One training step (forward and backward) of rnnfast's layers, between
cudaProfilerStart and cudaProfilerStop, for Nsight Compute
(scripts/gpu_check.py's ncu stage runs it with --profile-from-start off, so
only these steps are profiled, after a warm-up outside the range).

Steps: rnnfast.LSTM at T=100 B=64 I=H=512 in float32 and in bfloat16, and
rnnfast.LayerNormLSTM in float32, at the benchmark's headline shape.

    PYTHONPATH=. ncu --profile-from-start off --csv \\
        --metrics gpu__time_duration.sum python scripts/profile_step.py
"""

from __future__ import annotations

import argparse
import sys

import torch

import rnnfast

STEPS = [("LSTM", torch.float32), ("LSTM", torch.bfloat16), ("LayerNormLSTM", torch.float32)]


def training_step(model, x, hx, grad):
    for p in model.parameters():
        p.grad = None
    out, _ = model(x, hx)
    out.backward(grad)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("profile_step: CUDA is not available", file=sys.stderr)
        return 1
    cuda = args.device == "cuda"
    torch.manual_seed(0)
    for name, dtype in STEPS:
        opts = dict(device=args.device, dtype=dtype)
        model = getattr(rnnfast, name)(args.H, args.H, **opts)
        x = torch.randn(args.T, args.B, args.H, **opts, requires_grad=True)
        hx = (torch.randn(1, args.B, args.H, **opts), torch.randn(1, args.B, args.H, **opts))
        grad = torch.randn(args.T, args.B, args.H, **opts)
        for _ in range(2):  # warm-up: cuBLAS handles, workspaces, the allocator
            training_step(model, x, hx, grad)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        training_step(model, x, hx, grad)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        print(f"profiled one training step of rnnfast.{name} {str(dtype)[6:]} "
              f"T={args.T} B={args.B} I=H={args.H}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
