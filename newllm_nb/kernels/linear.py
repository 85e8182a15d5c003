"""Matrix products on CPU through oneDNN: ``x @ w.T`` for the recurrence's steps and the model's hoisted layers.

On CPU in fp32 oneDNN's linear (the library ``nn.LSTM`` runs on) takes the shapes here, a batch of 64 rows at a
time step and the B*T rows of the hoisted layers and weight gradients, about twice as fast as the sgemm that
``torch.addmm`` / ``F.linear`` take on the CPUs measured (benchmarks/RESULTS.md, "The main job on a CPU").
Elsewhere (CUDA, half precision, oneDNN off) everything here is the plain torch op.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import workspace


@functools.cache
def _torch_op(namespace: str, name: str):
    """``torch.ops.<namespace>.<name>``, looked up once per process (None where this torch build lacks it)."""
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def _onednn_linear():
    """oneDNN's linear op (``x @ W.T``, with a fused bias, ReLU or add) where torch has it and oneDNN is on
    (``torch.backends.mkldnn.enabled`` is read on each call: it may be switched at any time)."""
    op = _torch_op("mkldnn", "_linear_pointwise")
    return op if op is not None and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else None


class Matmul:
    """``x @ w.T + add`` (``add`` a bias [N] or a tensor [B, N]), ReLU'd when asked, written into ``out`` when given:
    through oneDNN on CPU in fp32, else through ``mm`` / ``addmm`` (into ``out`` directly where the dtypes match)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.op = _onednn_linear() if device.type == "cpu" and dtype == torch.float32 else None

    def pack(self, w: torch.Tensor, rows: int) -> torch.Tensor:
        """``w`` [N, K] reordered once into oneDNN's blocked layout for products of ``rows`` rows, so the per-step
        products of the time loop skip the reorder each call otherwise makes (their results are the same, to the
        bit, for any number of rows); ``w`` itself where the products are not oneDNN's."""
        if self.op is None:
            return w
        reorder = _torch_op("mkldnn", "_reorder_linear_weight")
        return reorder(w.contiguous(), rows) if reorder is not None else w.contiguous()

    def weight_grad(self, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``dy.T @ x`` ([M, N], [M, K] -> [N, K]): a weight's gradient over all M positions."""
        return weight_grad(self.op, dy, x) if self.op is not None else torch.mm(dy.t(), x)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, add: Optional[torch.Tensor] = None, relu: bool = False,
                 out: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask`` (>= 0, shaped like the result: a dropout's scaled keep mask) multiplies it (before or after the
        ReLU is the same)."""
        if self.op is not None:
            return self._onednn(x, w, add, relu, mask, out)
        direct = out is not None and out.dtype == x.dtype
        kw = {"out": out} if direct else {}
        y = torch.mm(x, w.t(), **kw) if add is None else torch.addmm(add, x, w.t(), **kw)
        y = y if mask is None else y.mul_(mask)
        y = y.relu_() if relu else y
        return y if out is None or direct else out.copy_(y)

    def _onednn(self, x: torch.Tensor, w: torch.Tensor, add: Optional[torch.Tensor], relu: bool,
                mask: Optional[torch.Tensor], out: Optional[torch.Tensor]) -> torch.Tensor:
        # A [B, N] addend and the mask are applied after the product, the last op writing into ``out``: oneDNN's
        # fused add / multiply of a tensor measured slower here than the plain product and one elementwise op.
        rows = add is not None and add.dim() > 1
        y = self.op(x, w, None if rows else add, "relu" if relu and not rows else "none", [], "")
        last = y if out is None else out
        if rows:
            y = torch.add(y, add, out=last if mask is None else y)
            y = y.relu_() if relu else y
        if mask is not None:
            return torch.mul(y, mask, out=last)
        return y if y is last else last.copy_(y)


def transposed(name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` [M, K] as a contiguous [K, M], in the workspace's buffer ``name``."""
    return workspace.empty(name, (x.shape[1], x.shape[0]), x.dtype, x.device).copy_(x.t())


def weight_grad(op, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy.T @ x`` ([M, N], [M, K] -> [N, K]) through oneDNN: its inner-product backward-weights primitive where
    torch has it (it reads both operands as they lie, rows of positions: 20% faster here than transposing them for
    the forward product), else ``op`` on the transposed operands."""
    bw = _torch_op("aten", "mkldnn_linear_backward_weights")
    return backward_weights(bw, dy, x) if bw is not None else transposed_product(op, dy, x)


def backward_weights(bw, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy.T @ x`` by ``aten.mkldnn_linear_backward_weights`` (``bw``), which takes oneDNN tensors (copies of
    ``dy`` and ``x``) and a dense weight of the result's dtype (``dy`` stands in: only its dtype is read)."""
    return bw(dy.contiguous().to_mkldnn(), x.contiguous().to_mkldnn(), dy, False)[0]


def transposed_product(op, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy.T @ x`` by oneDNN's linear ``op`` on both operands transposed into kept buffers (the op would copy them
    into fresh ones: the same work, but paged in anew each step)."""
    return op(transposed("grad_rows", dy), transposed("grad_cols", x), None, "none", [], "")


def _use_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and _onednn_linear() is not None)


class _Linear(torch.autograd.Function):
    """``F.linear`` with every product through oneDNN: y = x W^T + b, dx = dy W, dW = dy^T x, db = sum dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, w)
        ctx.has_bias, ctx.shape = b is not None, x.shape
        return _onednn_linear()(x2, w.contiguous(), b, "none", [], "").view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w = ctx.saved_tensors
        op = _onednn_linear()
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx = op(dy2, w.t().contiguous(), None, "none", [], "").view(ctx.shape) if ctx.needs_input_grad[0] else None
        dw = weight_grad(op, dy2, x2) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, w, b)``; on CPU in fp32 through oneDNN, forward and backward."""
    return _Linear.apply(x, w, b) if _use_onednn(x, w) else F.linear(x, w, b)
