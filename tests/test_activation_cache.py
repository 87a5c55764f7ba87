"""The CPU cache of large activation buffers (csrc/cpu/activation_cache.h):
buffers are reused across training steps, never while in use, and the cache
can be emptied or turned off."""

import os
import subprocess
import sys
import threading

import torch

import rnnfast
from rnnfast import _C


def _train_step(module, x, seed=0):
    torch.manual_seed(seed)
    out, (h, c) = module(x)
    grads = torch.autograd.grad((out * out).sum() + h.sum() + c.sum(),
                                [x, *module.parameters()])
    return out.detach(), [g.detach() for g in grads]


def _big_case(module_cls):
    # [T * B, 4H] float32 buffers of 2 MiB: above the cache's 1 MiB floor.
    torch.manual_seed(0)
    m = module_cls(16, 32)
    x = torch.randn(128, 32, 16, requires_grad=True)
    return m, x


def test_training_steps_reuse_and_empty_cache():
    for cls in (rnnfast.LSTM, rnnfast.LayerNormLSTM):
        m, x = _big_case(cls)
        rnnfast.empty_cache()
        first = _train_step(m, x)
        assert _C.cache_bytes() > 0, cls  # the step's buffers came back
        second = _train_step(m, x)
        torch.testing.assert_close(second[0], first[0], atol=0, rtol=0)
        for a, b in zip(second[1], first[1]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        freed = rnnfast.empty_cache()
        assert freed > 0 and _C.cache_bytes() == 0, cls


def test_buffers_in_use_are_never_shared():
    """Two forwards alive at once (both graphs kept) get separate saved
    buffers: each backward equals the backward of a lone forward."""
    for cls in (rnnfast.LSTM, rnnfast.LayerNormLSTM):
        m, x = _big_case(cls)
        y = torch.randn_like(x).requires_grad_()
        alone_x = _train_step(m, x)
        alone_y = _train_step(m, y)
        out_x, (hx_, cx_) = m(x)
        out_y, (hy_, cy_) = m(y)  # may reuse blocks freed by the lone steps
        gy = torch.autograd.grad((out_y * out_y).sum() + hy_.sum() + cy_.sum(),
                                 [y, *m.parameters()])
        gx = torch.autograd.grad((out_x * out_x).sum() + hx_.sum() + cx_.sum(),
                                 [x, *m.parameters()])
        for got, want in ((gx, alone_x[1]), (gy, alone_y[1])):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_concurrent_training_threads():
    """Training steps in two Python threads at once (the ops release the GIL)
    take and return cached blocks concurrently and still compute exactly
    what they compute alone."""
    cases = [_big_case(rnnfast.LayerNormLSTM), _big_case(rnnfast.LSTM)]
    alone = [_train_step(m, x) for m, x in cases]
    errors = []

    def work(i):
        try:
            m, x = cases[i]
            for _ in range(5):
                out, grads = _train_step(m, x)
                # Not bitwise: BLAS may split a GEMM differently when the
                # threads compete; a shared buffer would be far off.
                torch.testing.assert_close(out, alone[i][0], atol=1e-5, rtol=1e-5)
                for a, b in zip(grads, alone[i][1]):
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        except Exception as e:  # reported below, from the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_cache_turned_off_by_environment():
    code = (
        "import torch, rnnfast\n"
        "from rnnfast import _C\n"
        "m = rnnfast.LayerNormLSTM(16, 32)\n"
        "x = torch.randn(128, 32, 16, requires_grad=True)\n"
        "out, _ = m(x)\n"
        "out.sum().backward()\n"
        "assert _C.cache_bytes() == 0, _C.cache_bytes()\n"
        "assert rnnfast.empty_cache() == 0\n"
    )
    env = dict(os.environ, RNNFAST_CPU_CACHE_MB="0")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
