"""Matrix products on CPU through oneDNN: ``x @ w.T`` for the recurrence's steps and the model's hoisted layers.

On CPU in fp32 oneDNN's linear (the library ``nn.LSTM`` runs on) takes the shapes here, a batch of 64 rows at a
time step and the B*T rows of the hoisted layers and weight gradients, about twice as fast as the sgemm that
``torch.addmm`` / ``F.linear`` take on the CPUs measured (benchmarks/RESULTS.md, "The main job on a CPU").
Elsewhere (CUDA, half precision, oneDNN off) everything here is the plain torch op.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _onednn_linear():
    """oneDNN's linear op (``x @ W.T``, with a fused bias, ReLU or add) where torch has it and oneDNN is on."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return op if op is not None and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else None


class Matmul:
    """``x @ w.T + add`` (``add`` a bias [N] or a tensor [B, N]), ReLU'd when asked, written into ``out`` when given:
    through oneDNN on CPU in fp32, else through ``mm`` / ``addmm`` (into ``out`` directly where the dtypes match)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.op = _onednn_linear() if device.type == "cpu" and dtype == torch.float32 else None

    def __call__(self, x: torch.Tensor, w: torch.Tensor, add: Optional[torch.Tensor] = None, relu: bool = False,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.op is not None:
            if add is not None and add.dim() > 1:
                y = self.op.binary(x, add, w, None, "add")
                y = y.relu_() if relu else y
            else:
                y = self.op(x, w, add, "relu" if relu else "none", [], "")
        else:
            direct = out is not None and out.dtype == x.dtype
            kw = {"out": out} if direct else {}
            y = torch.mm(x, w.t(), **kw) if add is None else torch.addmm(add, x, w.t(), **kw)
            y = y.relu_() if relu else y
            if direct:
                return y
        return y if out is None else out.copy_(y)


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
        dw = op(dy2.t(), x2.t(), None, "none", [], "") if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, w, b)``; on CPU in fp32 through oneDNN, forward and backward."""
    return _Linear.apply(x, w, b) if _use_onednn(x, w) else F.linear(x, w, b)
