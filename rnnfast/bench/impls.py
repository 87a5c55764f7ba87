"""The implementations a benchmark times, each behind one small interface.

An :class:`Impl` builds, for a :class:`~rnnfast.bench.cases.Case` and its
pre-generated :class:`Inputs`, a :class:`Runner` whose ``step(i)`` is the
timed work on input set ``i``: a forward under ``torch.inference_mode`` for
inference, a forward and a backward (into fresh parameter and input
gradients, as after ``optimizer.zero_grad()``) for training.

Families and their baselines (the ``ratio`` of a row is the baseline's time
over the row's, so above 1 is faster):

* ``LSTM``: rnnfast.LSTM, reference.LSTM and peers against torch.nn.LSTM
  (cuDNN on GPU, oneDNN or the native kernels on CPU).
* ``LayerNormLSTM``: rnnfast.LayerNormLSTM, its torch.compile'd reference
  and peers against the eager reference.LayerNormLSTM.
* ``floor``: gemm-floor, the GEMMs of the recurrence alone, each through
  the fastest product this machine offers for its shape (chosen per GEMM by
  timing the candidates: torch.mm, F.linear, and on CPUs MKL's packed GEMM,
  oneDNN's packed linear and rnnfast's own small-batch step product), the
  lower bound every implementation is measured against.

``rnnfast.LSTM (cuda-graph)`` and ``rnnfast.LayerNormLSTM (cuda-graph)``
replay the same calls from CUDA graphs (``torch.cuda.graph``), one per input
set: rnnfast's ops are capturable, so launch overhead can go.

A ``decode`` case carries the state from call to call: each call is one
step ``[1, B, I]`` from the previous call's ``(h, c)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from .cases import Case

__all__ = ["Impl", "Runner", "Inputs", "Gemm", "Product", "PRODUCTS", "BASELINES", "FAMILIES",
           "discover", "make_inputs", "floor_gemms", "fastest_product", "arithmetic_bound", "SkipCase"]

BASELINES = {
    "LSTM": "torch.nn.LSTM",
    "LayerNormLSTM": "reference.LayerNormLSTM",
    "Zoneout": "nn.LSTMCell zoneout loop",
    "floor": "torch.nn.LSTM",
}
FAMILIES = ("LSTM", "LayerNormLSTM", "Zoneout")
# The zoneout rates of the "Zoneout" family (--regularisers), on h and c.
ZONEOUT_RATE = 0.1


class SkipCase(Exception):
    """An implementation does not support a case (the message says why)."""


@dataclass
class Inputs:
    """Random inputs shared by every implementation of a case, rotated
    between timed calls: ``x`` ``[T, B, I]`` (requires grad in training),
    ``hx`` ``([L*D, B, H], [L*D, B, H])`` and ``grad`` ``[T, B, D*H]``, the
    gradient of the output fed to the backward (None for inference)."""

    x: list[Tensor]
    hx: list[tuple[Tensor, Tensor]]
    grad: list[Optional[Tensor]]

    def __len__(self) -> int:
        return len(self.x)

    def tensors(self) -> list[Tensor]:
        out = list(self.x)
        for h, c in self.hx:
            out += [h, c]
        return out


def make_inputs(case: Case, count: int, seed: int = 0) -> Inputs:
    """``count`` sets of random inputs for ``case`` (never zeros)."""
    g = torch.Generator(device=case.device).manual_seed(seed)
    opts = dict(device=case.device, dtype=case.torch_dtype, generator=g)
    states = case.layers * case.directions
    training = case.mode == "training"
    xs, hxs, grads = [], [], []
    for _ in range(count):
        xs.append(torch.randn(case.T, case.B, case.I, **opts).requires_grad_(training))
        hxs.append((torch.randn(states, case.B, case.H, **opts),
                    torch.randn(states, case.B, case.H, **opts)))
        grads.append(torch.randn(case.T, case.B, case.directions * case.H, **opts)
                     if training else None)
    return Inputs(xs, hxs, grads)


@dataclass
class Runner:
    """What the timer calls. ``step(i)`` runs the timed work on input set
    ``i``; ``output(i)`` returns the output ``[T, B, D*H]`` computed the same
    way (for the agreement check), or None; ``module`` holds the parameters
    (for loading the baseline's weights); ``keep`` lists tensors that exist
    whatever the implementation (parameters, inputs), left out of the
    activation memory; ``backend`` says how it runs, where that varies."""

    step: Callable[[int], None]
    output: Optional[Callable[[int], Tensor]] = None
    module: Optional[nn.Module] = None
    keep: list[Tensor] = field(default_factory=list)
    backend: Optional[str] = None
    # the same work run eagerly, for the memory accounting of a graphed step
    # (a replay allocates and saves nothing); None: ``step`` itself
    eager_step: Optional[Callable[[int], None]] = None


@dataclass
class Impl:
    """A named implementation in a family; ``build(case, inputs)`` returns
    a :class:`Runner` or raises :class:`SkipCase`."""

    name: str
    family: str
    build: Callable[[Case, Inputs], Runner]
    compiled: bool = False

    @property
    def baseline(self) -> str:
        return BASELINES[self.family]

    @property
    def is_baseline(self) -> bool:
        return self.name == self.baseline


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------

# call(x, hx) -> (output [T, B, D*H], (h, c)) as nn.LSTM returns them
Call = Callable[[Tensor, tuple[Tensor, Tensor]], tuple]


def module_runner(module: nn.Module, call: Call, case: Case, inputs: Inputs,
                  params_module: Optional[nn.Module] = None) -> Runner:
    """A runner around ``call(x, hx) -> (output, state)`` of a module (for
    a decode case, :func:`decode_runner`)."""
    if case.decode:
        return decode_runner(module, call, case, inputs, params_module)
    training = case.mode == "training"
    holder = params_module if params_module is not None else module
    holder.train(training)
    params = list(holder.parameters())

    def step(i: int) -> None:
        x = inputs.x[i]
        if training:
            for p in params:
                p.grad = None
            x.grad = None
            call(x, inputs.hx[i])[0].backward(inputs.grad[i])
        else:
            with torch.inference_mode():
                call(x, inputs.hx[i])

    def output(i: int) -> Tensor:
        if training:  # the graph that is timed (matters under torch.compile)
            return call(inputs.x[i], inputs.hx[i])[0].detach()
        with torch.inference_mode():
            return call(inputs.x[i], inputs.hx[i])[0].clone()

    return Runner(step, output, holder, params + inputs.tensors())


def decode_runner(module: nn.Module, call: Call, case: Case, inputs: Inputs,
                  params_module: Optional[nn.Module] = None) -> Runner:
    """Streaming decode: each call runs one step ``inputs.x[i]`` (``[1, B,
    I]``) from the state the previous call left, and leaves its own. The
    state lives in fixed tensors (copied into, so a CUDA graph can replay
    the step); it starts from ``inputs.hx[0]``."""
    holder = params_module if params_module is not None else module
    holder.eval()
    state = tuple(t.clone() for t in inputs.hx[0])

    def step(i: int) -> None:
        with torch.inference_mode():
            _, (h, c) = call(inputs.x[i], state)
            state[0].copy_(h)
            state[1].copy_(c)

    def output(i: int) -> Tensor:
        with torch.inference_mode():
            return call(inputs.x[i], inputs.hx[i])[0].clone()

    return Runner(step, output, holder, list(holder.parameters()) + inputs.tensors()
                  + list(state))


def _module_kwargs(case: Case) -> dict:
    return dict(num_layers=case.layers, bidirectional=case.bidirectional,
                device=case.device, dtype=case.torch_dtype)


def _nn_style(cls) -> Callable[[Case, Inputs], Runner]:
    """Builder for a module with nn.LSTM's constructor and forward."""
    def build(case: Case, inputs: Inputs) -> Runner:
        module = cls(case.I, case.H, **_module_kwargs(case))
        return module_runner(module, module, case, inputs)
    return build


def _compiled_reference(case: Case, inputs: Inputs) -> Runner:
    # A fresh compile per case: dynamo's cache is per code object, and past
    # its recompile limit it would silently run the eager code instead.
    torch._dynamo.reset()
    module = reference.ReferenceLayerNormLSTM(case.I, case.H, **_module_kwargs(case))
    compiled = torch.compile(module, dynamic=False)
    return module_runner(compiled, compiled, case, inputs, params_module=module)


# ---------------------------------------------------------------------------
# Zoneout (issue 15, --regularisers): what users write today against rnnfast
# ---------------------------------------------------------------------------

class LSTMCellZoneout(nn.Module):
    """Zoneout (Krueger et al. 2016) on h and c around nn.LSTMCell, as one
    writes it without rnnfast: a Python loop over time, a mask per step."""

    def __init__(self, input_size: int, hidden_size: int, rate: float, **factory) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size, **factory)
        self.rate = rate

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor]) -> tuple:
        h, c = hx[0][0], hx[1][0]
        outputs = []
        for t in range(x.shape[0]):
            h_new, c_new = self.cell(x[t], (h, c))
            if self.training:
                m_h = torch.empty_like(h).bernoulli_(self.rate)
                m_c = torch.empty_like(c).bernoulli_(self.rate)
            else:
                m_h = m_c = self.rate
            h = m_h * h + (1 - m_h) * h_new
            c = m_c * c + (1 - m_c) * c_new
            outputs.append(h)
        return torch.stack(outputs), (h[None], c[None])


def _zoneout(build_module: Callable[[Case], nn.Module]) -> Callable[[Case, Inputs], Runner]:
    """A member of the Zoneout family: one unidirectional layer, zoneout
    ZONEOUT_RATE on h and c; no agreement check (random masks)."""
    def build(case: Case, inputs: Inputs) -> Runner:
        if case.layers != 1 or case.bidirectional or case.decode:
            raise SkipCase("the zoneout cases are one unidirectional layer over a sequence")
        module = build_module(case)
        runner = module_runner(module, module, case, inputs)
        runner.output = None
        return runner
    return build


def _lstm_cell_zoneout(case: Case) -> nn.Module:
    return LSTMCellZoneout(case.I, case.H, ZONEOUT_RATE, device=case.device,
                           dtype=case.torch_dtype)


def _rnnfast_zoneout(case: Case) -> nn.Module:
    import rnnfast
    return rnnfast.LSTM(case.I, case.H, device=case.device, dtype=case.torch_dtype,
                        zoneout_hidden=ZONEOUT_RATE, zoneout_cell=ZONEOUT_RATE)


# ---------------------------------------------------------------------------
# Peers (optional packages)
# ---------------------------------------------------------------------------

def _single_layer_cuda(case: Case, who: str) -> None:
    if case.device != "cuda":
        raise SkipCase(f"{who} runs on CUDA only")
    if case.layers != 1 or case.bidirectional:
        raise SkipCase(f"{who} has one unidirectional layer only")
    if case.decode:
        raise SkipCase(f"{who} takes no initial state to carry")


def _haste(class_name: str) -> Callable[[Case, Inputs], Runner]:
    def build(case: Case, inputs: Inputs) -> Runner:
        _single_layer_cuda(case, f"haste_pytorch.{class_name}")
        haste = importlib.import_module("haste_pytorch")
        module = getattr(haste, class_name)(case.I, case.H).to(case.device, case.torch_dtype)
        # haste's forward takes no initial state: it starts from zeros
        return module_runner(module, lambda x, hx: (module(x)[0], None), case, inputs)
    return build


def _flashrnn(case: Case, inputs: Inputs) -> Runner:
    _single_layer_cuda(case, "flashrnn")
    flashrnn = importlib.import_module("flashrnn").flashrnn
    T, B, H = case.T, case.B, case.H
    opts = dict(device=case.device, dtype=case.torch_dtype)
    k = 1.0 / math.sqrt(H)
    module = nn.Module()  # flashrnn is functional: hold its weights here
    module.weight_ih = nn.Parameter(torch.empty(4 * H, case.I, **opts).uniform_(-k, k))
    module.R = nn.Parameter(torch.empty(4, 1, H, H, **opts).uniform_(-k, k))  # [G, N, D, D]
    module.b = nn.Parameter(torch.empty(4, 1, H, **opts).uniform_(-k, k))     # [G, N, D]
    backend = ["cuda_fused"]

    def call(x: Tensor, hx: tuple[Tensor, Tensor]) -> tuple:
        # Wx: [B, T, G, N, D]; states: [S, B, 1, N, D]; output: [S, B, T(+1), N, D]
        wx = F.linear(x, module.weight_ih).view(T, B, 4, 1, H).transpose(0, 1).contiguous()
        states = torch.stack([hx[0][0], hx[1][0]]).view(2, B, 1, 1, H)
        try:
            h, _ = flashrnn(wx, module.R, module.b, states=states, function="lstm",
                            backend=backend[0], dtype=case.dtype)
        except Exception:
            if backend[0] != "cuda_fused":
                raise
            backend[0] = "cuda"  # the fused kernel limits the hidden size
            h, _ = flashrnn(wx, module.R, module.b, states=states, function="lstm",
                            backend=backend[0], dtype=case.dtype)
        return h[0, :, -T:].reshape(B, T, H).transpose(0, 1), None

    return module_runner(module, call, case, inputs)


_PEERS = [
    ("haste_pytorch", "haste_pytorch.LSTM", "LSTM", _haste("LSTM")),
    ("haste_pytorch", "haste_pytorch.LayerNormLSTM", "LayerNormLSTM",
     _haste("LayerNormLSTM")),
    ("flashrnn", "flashrnn.LSTM", "LSTM", _flashrnn),
]


# ---------------------------------------------------------------------------
# The GEMM floor
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Gemm:
    """``count`` products ``[m, k] @ [k, n]`` of one layer and direction."""

    what: str
    m: int
    k: int
    n: int
    count: int
    layer: int
    direction: int

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


def floor_gemms(case: Case) -> list[Gemm]:
    """The GEMMs any LSTM (or LayerNorm-LSTM) of ``case`` must do.

    Forward, per layer and direction: one input GEMM for all steps and T
    recurrent GEMMs. Training adds T recurrent backward GEMMs and the bulk
    gradients of W_hh, W_ih and the layer's input (the benchmark's inputs
    require grad, as behind an embedding or another layer).
    """
    T, B, H, G = case.T, case.B, case.H, 4 * case.H
    gemms = []
    for layer in range(case.layers):
        size_in = case.I if layer == 0 else case.directions * H
        for d in range(case.directions):
            gemms += [Gemm("x @ W_ih^T", T * B, size_in, G, 1, layer, d),
                      Gemm("h_t @ W_hh^T", B, H, G, T, layer, d)]
            if case.mode == "training":
                gemms += [Gemm("dG_t @ W_hh", B, G, H, T, layer, d),
                          Gemm("dG^T @ h", G, T * B, H, 1, layer, d),
                          Gemm("dG^T @ x", G, T * B, size_in, 1, layer, d),
                          Gemm("dG @ W_ih", T * B, G, size_in, 1, layer, d)]
    return gemms


@dataclass(frozen=True)
class Product:
    """One way to compute ``a [m, k] @ b [k, n]``: ``prepare(b, m)`` once
    (outside the timing: a packed copy of a weight), then ``run(a,
    prepared, out)`` per call, into ``out`` or returning a new tensor.
    ``weights_only``: it packs ``b``, so it serves only products with a
    fixed weight (an activation would have to be packed every call)."""

    name: str
    prepare: Callable[[Tensor, int], object]
    run: Callable[[Tensor, object, Tensor], Optional[Tensor]]
    weights_only: bool
    available: Callable[[str, torch.dtype], bool]


def _mm_run(a: Tensor, b: Tensor, out: Tensor) -> None:
    torch.mm(a, b, out=out)


def _mkl_prepare(b: Tensor, m: int) -> tuple:
    w = b.t().contiguous()
    return torch.ops.mkl._mkl_reorder_linear_weight(w, m), w


def _mkl_run(a: Tensor, packed: tuple, out: Tensor) -> Tensor:
    return torch.ops.mkl._mkl_linear(a, packed[0], packed[1], None, a.shape[0])


def _onednn_run(a: Tensor, packed: Tensor, out: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")


def _step_prepare(b: Tensor, m: int) -> tuple:
    """rnnfast's own per-step product of ``m`` rows or fewer (at most 32),
    packed as a time loop packs its recurrent weight."""
    from .. import _C

    w = b.t().contiguous()  # [n, k], rows are outputs, as nn weights
    return _C._StepProduct("rnnfast", m, w.shape[0], w.shape[1], w.data_ptr(), w.stride(0),
                           True), w


def _check_float32_rows(a: Tensor, out: Tensor, what: str) -> None:
    """rnnfast's own products take raw rows of float32 (a candidate that
    raises is left out of the floor)."""
    if a.stride(1) != 1 or out.stride(1) != 1 or out.dtype != torch.float32:
        raise RuntimeError(f"the {what} reads and writes rows of float32")


def _step_run(a: Tensor, prepared: tuple, out: Tensor) -> None:
    _check_float32_rows(a, out, "step product")
    prepared[0].multiply(a.shape[0], a.data_ptr(), a.stride(0), 0.0, out.data_ptr(),
                         out.stride(0))


def _once_run(a: Tensor, w: Tensor, out: Tensor) -> None:
    """rnnfast's product of a weight used once, read as stored (``w`` is
    ``[n, k]``, as nn weights): what a one-step call runs, at most 16 rows."""
    from .. import _C

    _check_float32_rows(a, out, "one-use product")
    _C._one_use_product("rnnfast", a.shape[0], w.shape[0], w.shape[1], a.data_ptr(),
                        a.stride(0), w.data_ptr(), w.stride(0), 0, 0.0, out.data_ptr(),
                        out.stride(0))


def _step_available(device: str, dtype: torch.dtype) -> bool:
    import rnnfast

    return (device == "cpu" and dtype == torch.float32
            and rnnfast.build_info()["cpu_step_gemm_kernels"] != "none")


def _cpu_op(namespace: str, *names: str) -> Callable[[str, torch.dtype], bool]:
    def available(device: str, dtype: torch.dtype) -> bool:
        if device != "cpu":
            return False
        ns = getattr(torch.ops, namespace)
        return all(hasattr(ns, n) for n in names)
    return available


PRODUCTS = [
    Product("mm", lambda b, m: b, _mm_run, False, lambda device, dtype: True),
    Product("linear", lambda b, m: b.t().contiguous(), lambda a, w, out: F.linear(a, w), True,
            lambda device, dtype: True),
    # MKL's packed GEMM (cblas_sgemm_compute), as Inductor uses for float32 linears
    Product("mkl-packed", _mkl_prepare, _mkl_run, True,
            lambda device, dtype: (dtype == torch.float32 and torch._C.has_mkl
                                   and _cpu_op("mkl", "_mkl_reorder_linear_weight",
                                               "_mkl_linear")(device, dtype))),
    # oneDNN's inner product on a weight reordered once
    Product("onednn-packed",
            lambda b, m: torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), m),
            _onednn_run, True,
            lambda device, dtype: (dtype in (torch.float32, torch.bfloat16)
                                   and torch.backends.mkldnn.is_available()
                                   and _cpu_op("mkldnn", "_reorder_linear_weight",
                                               "_linear_pointwise")(device, dtype))),
    # rnnfast's own small-batch product (csrc/cpu/step_gemm.h), which its
    # CPU time loop runs where it beats the BLAS: at most 32 rows
    Product("rnnfast-step", _step_prepare, _step_run, True, _step_available),
    # rnnfast's product of a weight used once, in its stored layout
    # (csrc/cpu/step_gemm.h, multiply_stored): a one-step call's products
    Product("rnnfast-once", lambda b, m: b.t().contiguous(), _once_run, True,
            _step_available),
]


def _seconds_per_call(fn: Callable[[], object], device: str, min_s: float = 2e-3) -> float:
    """The best of three blocks of calls, each block at least ``min_s``."""
    from .timing import synchronize

    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    number = max(1, int(min_s / max(time.perf_counter() - start, 1e-7)))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / number)
    return best


def fastest_product(a: Tensor, b: Tensor, out: Tensor, weight: bool,
                    device: str) -> tuple[Product, object, dict[str, float]]:
    """The fastest :data:`PRODUCTS` entry for ``a @ b`` on this machine
    (those that pack only when ``b`` is a ``weight``), measured here, with
    its prepared operand and every candidate's seconds per call. A
    candidate that raises or disagrees with torch.mm is left out."""
    want = torch.mm(a, b)
    tol = 1e-2 if a.dtype in (torch.float16, torch.bfloat16) else 1e-4
    scale = want.abs().max().item() + 1.0
    best: Optional[tuple[float, Product, object]] = None
    seconds: dict[str, float] = {}
    for product in PRODUCTS:
        if (product.weights_only and not weight) or not product.available(device, a.dtype):
            continue
        try:
            prepared = product.prepare(b, a.shape[0])
            got = product.run(a, prepared, out)
            got = out if got is None else got
            if (got.float() - want.float()).abs().max().item() > tol * scale:
                continue
            t = _seconds_per_call(lambda: product.run(a, prepared, out), device)
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        seconds[product.name] = t
        if best is None or t < best[0]:
            best = (t, product, prepared)
    assert best is not None  # torch.mm always qualifies
    return best[1], best[2], seconds


def _gemm_floor(case: Case, inputs: Inputs) -> Runner:
    """Runs exactly :func:`floor_gemms` on random operands (rotated like
    the inputs), each GEMM through the product that is fastest for its
    shape here (:func:`fastest_product`, chosen once per shape; the
    backend field says which won). On CUDA the calls are replayed from a
    CUDA graph (no launch overhead); elsewhere each GEMM pays torch's
    per-call overhead, as any eager implementation does, so for small
    shapes a fused implementation can beat this floor."""
    T, B, H, G = case.T, case.B, case.H, 4 * case.H
    training = case.mode == "training"
    opts = dict(device=case.device, dtype=case.torch_dtype)
    chosen: dict[tuple, tuple[Product, dict[str, float]]] = {}

    def pick(what: str, a: Tensor, b: Tensor, out: Tensor, weight: bool) -> tuple:
        """(run, prepared) for ``a @ b`` into ``out``."""
        key = (what, *a.shape, b.shape[1])
        with torch.inference_mode():
            if key not in chosen:
                product, prepared, seconds = fastest_product(a, b, out, weight, case.device)
                chosen[key] = (product, seconds)
            else:
                product = chosen[key][0]
                prepared = product.prepare(b, a.shape[0])
        return product.run, prepared

    plans = []  # one per layer and direction
    for layer in range(case.layers):
        size_in = case.I if layer == 0 else case.directions * H
        for _ in range(case.directions):
            w_ih, w_hh = torch.randn(G, size_in, **opts), torch.randn(G, H, **opts)
            sets = [(torch.randn(T * B, size_in, **opts),            # x
                     torch.randn(T, B, H, **opts),                   # h_t
                     torch.randn(T, B, G, **opts) if training else None)  # dG
                    for _ in range(len(inputs))]
            o = dict(gates=torch.empty(T, B, G, **opts), dh=torch.empty(B, H, **opts),
                     dw_hh=torch.empty(G, H, **opts), dw_ih=torch.empty(G, size_in, **opts),
                     dx=torch.empty(T * B, size_in, **opts))
            x0, h0, dg0 = sets[0]
            gemms = dict(
                x_ih=pick("x @ W_ih^T", x0, w_ih.t(), o["gates"].view(T * B, G), True),
                h_hh=pick("h_t @ W_hh^T", h0[0], w_hh.t(), o["gates"][0], True))
            if training:
                dg2 = dg0.view(T * B, G)
                gemms.update(
                    dg_hh=pick("dG_t @ W_hh", dg0[0], w_hh, o["dh"], True),
                    dw_hh=pick("dG^T @ h", dg2.t(), h0.view(T * B, H), o["dw_hh"], False),
                    dw_ih=pick("dG^T @ x", dg2.t(), x0, o["dw_ih"], False),
                    dx=pick("dG @ W_ih", dg2, w_ih, o["dx"], True))
            plans.append((sets, o, gemms))

    @torch.inference_mode()
    def step(i: int) -> None:
        for sets, o, g in plans:
            x, hs, dg = sets[i]
            gates = o["gates"]
            g["x_ih"][0](x, g["x_ih"][1], gates.view(T * B, G))
            run, prepared = g["h_hh"]
            for t in range(T):
                run(hs[t], prepared, gates[t])
            if training:
                run, prepared = g["dg_hh"]
                for t in range(T - 1, -1, -1):
                    run(dg[t], prepared, o["dh"])
                dg2 = dg.view(T * B, G)
                g["dw_hh"][0](dg2.t(), hs.view(T * B, H), o["dw_hh"])
                g["dw_ih"][0](dg2.t(), x, o["dw_ih"])
                g["dx"][0](dg2, g["dx"][1], o["dx"])

    by_product: dict[str, list[str]] = {}
    for (what, *_), (product, _) in chosen.items():
        if what not in by_product.setdefault(product.name, []):
            by_product[product.name].append(what)
    products = "; ".join(f"{name}: {', '.join(whats)}" for name, whats in by_product.items())
    bound = arithmetic_bound(case, chosen)
    if bound is not None:
        products += "; " + bound
    if case.device.startswith("cuda"):
        graphed = _cuda_graphs(step, len(inputs))
        if graphed is not None:
            return Runner(graphed, backend=f"cuda-graph; {products}")
    return Runner(step, backend=f"eager; {products}")


def arithmetic_bound(case: Case, chosen: dict) -> Optional[str]:
    """The case's multiply-adds at the best rate any of its products
    reached here (``chosen`` maps ``(what, m, k, n)`` to the winning
    product and every candidate's seconds per call): a time no
    implementation doing these GEMMs in this dtype can beat on this machine,
    whatever its overheads. None when no product was timed."""
    rate = 0.0  # FLOP/s
    for (what, m, k, n), (product, seconds) in chosen.items():
        if seconds.get(product.name):
            rate = max(rate, 2 * m * k * n / seconds[product.name])
    if rate == 0.0:
        return None
    flops = sum(g.flops for g in floor_gemms(case))
    return (f"arithmetic bound {flops / rate * 1e3:.3g} ms "
            f"({flops / 1e9:.3g} GFLOP at {rate / 1e9:.0f} GFLOP/s, "
            f"the best rate of these products here)")


def _cuda_graphs(step: Callable[[int], None], count: int,
                 strict: bool = False) -> Optional[Callable[[int], None]]:
    """``step(i)`` for each input set captured in a CUDA graph, so the
    replay holds no kernel-launch overhead; None when capture fails (or,
    with ``strict``, the error)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(count):
                step(i)
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for i in range(count):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(i)
            graphs.append(graph)
    except RuntimeError:
        if strict:
            raise
        return None
    return lambda i: graphs[i].replay()


def _graphed(build: Callable[[Case, Inputs], Runner]) -> Callable[[Case, Inputs], Runner]:
    """A builder whose runner replays the built runner's step from CUDA
    graphs, one per input set (training: forward and backward captured
    together)."""
    def build_graphed(case: Case, inputs: Inputs) -> Runner:
        if not case.device.startswith("cuda"):
            raise SkipCase("CUDA graphs need a CUDA device")
        runner = build(case, inputs)
        graphed = _cuda_graphs(runner.step, len(inputs), strict=True)
        return Runner(graphed, runner.output, runner.module, runner.keep,
                      backend="cuda-graph", eager_step=runner.step)
    return build_graphed


# ---------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------

def discover(compile: bool = False, regularisers: bool = False
             ) -> tuple[list[Impl], list[str]]:
    """Every implementation available here, baselines first, and notes on
    what was left out and why. ``regularisers`` adds the Zoneout family: a
    Python loop over nn.LSTMCell with zoneout against rnnfast.LSTM's."""
    import rnnfast

    notes: list[str] = []
    impls = [
        Impl("torch.nn.LSTM", "LSTM", _nn_style(nn.LSTM)),
        Impl("reference.LayerNormLSTM", "LayerNormLSTM",
             _nn_style(reference.ReferenceLayerNormLSTM)),
        Impl("gemm-floor", "floor", _gemm_floor),
        Impl("rnnfast.LSTM", "LSTM", _nn_style(rnnfast.LSTM)),
        Impl("reference.LSTM", "LSTM", _nn_style(reference.ReferenceLSTM)),
        Impl("rnnfast.LayerNormLSTM", "LayerNormLSTM", _nn_style(rnnfast.LayerNormLSTM)),
    ]
    if torch.cuda.is_available():
        impls += [Impl("rnnfast.LSTM (cuda-graph)", "LSTM", _graphed(_nn_style(rnnfast.LSTM))),
                  Impl("rnnfast.LayerNormLSTM (cuda-graph)", "LayerNormLSTM",
                       _graphed(_nn_style(rnnfast.LayerNormLSTM)))]
    else:
        notes.append("rnnfast.LSTM and rnnfast.LayerNormLSTM (cuda-graph): skipped, "
                     "no CUDA device")
    if compile:
        impls.append(Impl("torch.compile(reference.LayerNormLSTM)", "LayerNormLSTM",
                          _compiled_reference, compiled=True))
    if regularisers:
        impls += [Impl("nn.LSTMCell zoneout loop", "Zoneout", _zoneout(_lstm_cell_zoneout)),
                  Impl("rnnfast.LSTM (zoneout)", "Zoneout", _zoneout(_rnnfast_zoneout))]
    for package, name, family, build in _PEERS:
        if importlib.util.find_spec(package) is None:
            notes.append(f"{name}: skipped, {package} is not installed")
        else:
            impls.append(Impl(name, family, build))
    return impls, notes
