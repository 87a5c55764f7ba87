"""The in-process before/after of before_after.txt (1): a 2-layer decode
step of each cell, the old code and the new alternating block by block in
one process ("old": rnnfast.functional._inference_route forced False and
_flat_weights by getattr; "new": as committed). Run from the repository
root with the package built: python <this file> [threads]."""
import torch, time, statistics, sys, rnnfast
from rnnfast import functional as RF
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
real = RF._inference_route
from rnnfast import modules as M
real_fw = M._RecurrentBase._flat_weights
old_fw = property(lambda self: [getattr(self, n) for n in self._flat_weights_names])
def block(fn, n):
    t = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t) / n * 1e6
for cls in (rnnfast.LSTM, rnnfast.LayerNormLSTM):
  for H, B in ((8, 1), (256, 1), (512, 8)):
    torch.manual_seed(0)
    m = cls(H, H, num_layers=2).eval()
    x = torch.randn(1, B, H); hx = (torch.zeros(2, B, H), torch.zeros(2, B, H))
    call = lambda: m(x, hx)
    res = {"new": [], "old": []}
    with torch.inference_mode():
        n = max(20, int(0.02 / (block(call, 20) * 1e-6)))
        for rep in range(15):
            for k in ("new", "old"):
                RF._inference_route = real if k == "new" else (lambda *a: False)
                M._RecurrentBase._flat_weights = real_fw if k == "new" else old_fw
                res[k].append(block(call, n))
    RF._inference_route = real
    M._RecurrentBase._flat_weights = real_fw
    med = {k: statistics.median(v) for k, v in res.items()}
    iqr = {k: statistics.quantiles(v, n=4) for k, v in res.items()}
    print(f"{cls.__name__:14s} H={H:3d} B={B}: old {med['old']:7.1f} us (IQR {iqr['old'][2]-iqr['old'][0]:.1f})  new {med['new']:7.1f} us (IQR {iqr['new'][2]-iqr['new'][0]:.1f})  saved {med['old']-med['new']:5.1f} us  x{med['old']/med['new']:.2f}")
