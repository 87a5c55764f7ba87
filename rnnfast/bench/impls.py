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
* ``floor``: gemm-floor, the GEMMs of the recurrence alone through torch, the
  lower bound every implementation is measured against.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from .cases import Case

__all__ = ["Impl", "Runner", "Inputs", "Gemm", "BASELINES", "FAMILIES", "discover",
           "make_inputs", "floor_gemms", "SkipCase"]

BASELINES = {
    "LSTM": "torch.nn.LSTM",
    "LayerNormLSTM": "reference.LayerNormLSTM",
    "floor": "torch.nn.LSTM",
}
FAMILIES = ("LSTM", "LayerNormLSTM")


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

Call = Callable[[Tensor, tuple[Tensor, Tensor]], Tensor]


def module_runner(module: nn.Module, call: Call, case: Case, inputs: Inputs,
                  params_module: Optional[nn.Module] = None) -> Runner:
    """A runner around ``call(x, hx) -> output`` of a module."""
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
            call(x, inputs.hx[i]).backward(inputs.grad[i])
        else:
            with torch.inference_mode():
                call(x, inputs.hx[i])

    def output(i: int) -> Tensor:
        if training:  # the graph that is timed (matters under torch.compile)
            return call(inputs.x[i], inputs.hx[i]).detach()
        with torch.inference_mode():
            return call(inputs.x[i], inputs.hx[i]).clone()

    return Runner(step, output, holder, params + inputs.tensors())


def _module_kwargs(case: Case) -> dict:
    return dict(num_layers=case.layers, bidirectional=case.bidirectional,
                device=case.device, dtype=case.torch_dtype)


def _nn_style(cls) -> Callable[[Case, Inputs], Runner]:
    """Builder for a module with nn.LSTM's constructor and forward."""
    def build(case: Case, inputs: Inputs) -> Runner:
        module = cls(case.I, case.H, **_module_kwargs(case))
        return module_runner(module, lambda x, hx: module(x, hx)[0], case, inputs)
    return build


def _compiled_reference(case: Case, inputs: Inputs) -> Runner:
    # A fresh compile per case: dynamo's cache is per code object, and past
    # its recompile limit it would silently run the eager code instead.
    torch._dynamo.reset()
    module = reference.ReferenceLayerNormLSTM(case.I, case.H, **_module_kwargs(case))
    compiled = torch.compile(module, dynamic=False)
    return module_runner(compiled, lambda x, hx: compiled(x, hx)[0], case, inputs,
                         params_module=module)


# ---------------------------------------------------------------------------
# Peers (optional packages)
# ---------------------------------------------------------------------------

def _single_layer_cuda(case: Case, who: str) -> None:
    if case.device != "cuda":
        raise SkipCase(f"{who} runs on CUDA only")
    if case.layers != 1 or case.bidirectional:
        raise SkipCase(f"{who} has one unidirectional layer only")


def _haste(class_name: str) -> Callable[[Case, Inputs], Runner]:
    def build(case: Case, inputs: Inputs) -> Runner:
        _single_layer_cuda(case, f"haste_pytorch.{class_name}")
        haste = importlib.import_module("haste_pytorch")
        module = getattr(haste, class_name)(case.I, case.H).to(case.device, case.torch_dtype)
        # haste's forward takes no initial state: it starts from zeros
        return module_runner(module, lambda x, hx: module(x)[0], case, inputs)
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

    def call(x: Tensor, hx: tuple[Tensor, Tensor]) -> Tensor:
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
        return h[0, :, -T:].reshape(B, T, H).transpose(0, 1)

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


def _gemm_floor(case: Case, inputs: Inputs) -> Runner:
    """Runs exactly :func:`floor_gemms` with torch.mm into preallocated
    outputs, on random operands (rotated like the inputs). On CUDA the
    calls are replayed from a CUDA graph (no launch overhead); elsewhere each
    GEMM pays torch's per-call overhead, as any eager implementation does, so
    for small shapes a fused implementation can beat this floor."""
    T, B, H, G = case.T, case.B, case.H, 4 * case.H
    training = case.mode == "training"
    opts = dict(device=case.device, dtype=case.torch_dtype)
    plans = []  # one per layer and direction
    for layer in range(case.layers):
        size_in = case.I if layer == 0 else case.directions * H
        for _ in range(case.directions):
            w_ih, w_hh = torch.randn(G, size_in, **opts), torch.randn(G, H, **opts)
            sets = [(torch.randn(T * B, size_in, **opts),            # x
                     torch.randn(T, B, H, **opts),                   # h_t
                     torch.randn(T, B, G, **opts) if training else None)  # dG
                    for _ in range(len(inputs))]
            outs = dict(gates=torch.empty(T, B, G, **opts),
                        dh=torch.empty(B, H, **opts),
                        dw_hh=torch.empty(G, H, **opts),
                        dw_ih=torch.empty(G, size_in, **opts),
                        dx=torch.empty(T * B, size_in, **opts))
            plans.append((w_ih, w_hh, sets, outs))

    @torch.inference_mode()
    def step(i: int) -> None:
        for w_ih, w_hh, sets, o in plans:
            x, hs, dg = sets[i]
            gates = o["gates"]
            torch.mm(x, w_ih.t(), out=gates.view(T * B, G))
            for t in range(T):
                gates[t].addmm_(hs[t], w_hh.t())
            if training:
                for t in range(T - 1, -1, -1):
                    torch.mm(dg[t], w_hh, out=o["dh"])
                dg2 = dg.view(T * B, G)
                torch.mm(dg2.t(), hs.view(T * B, H), out=o["dw_hh"])
                torch.mm(dg2.t(), x, out=o["dw_ih"])
                torch.mm(dg2, w_ih, out=o["dx"])

    if case.device.startswith("cuda"):
        graphed = _cuda_graphs(step, len(inputs))
        if graphed is not None:
            return Runner(graphed, backend="cuda-graph")
    return Runner(step, backend="eager")


def _cuda_graphs(step: Callable[[int], None], count: int) -> Optional[Callable[[int], None]]:
    """``step(i)`` for each input set captured in a CUDA graph, so the floor
    holds no kernel-launch overhead; None when capture fails."""
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
        return None
    return lambda i: graphs[i].replay()


# ---------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------

def discover(compile: bool = False) -> tuple[list[Impl], list[str]]:
    """Every implementation available here, baselines first, and notes on
    what was left out and why."""
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
    if compile:
        impls.append(Impl("torch.compile(reference.LayerNormLSTM)", "LayerNormLSTM",
                          _compiled_reference, compiled=True))
    for package, name, family, build in _PEERS:
        if importlib.util.find_spec(package) is None:
            notes.append(f"{name}: skipped, {package} is not installed")
        else:
            impls.append(Impl(name, family, build))
    return impls, notes
