"""GPU fast path: the hoisted recurrence's forward + backward captured in one CUDA graph.

Why a graph: a New-LLM step is T sequential tiny kernels per layer (T = 63 or 127), so eager
PyTorch is bound by kernel-launch overhead, not FLOPs. Replaying a captured graph launches the whole
forward + backward at once.

What is captured and why only that: forward, loss and backward (scaled by the GradScaler's device
tensor in fp16). The gradient unscale / inf check, norm clipping and the (fused, single-kernel)
Adam step stay eager. The fp16 GradScaler's inf check reads a device flag and may skip the step:
that decision cannot live inside a static graph, and keeping it outside makes fp16, bf16 and fp32
share one code path, the non-finite-loss guard included, at the cost of a few extra launches.

Inside the graph the model runs its hand-written BPTT (``recurrence.py``) unless
``fast_path="graph-autograd"`` or ``"compile"`` asks for autograd through the loop.

Static shapes: one graph per batch shape; a batch of another shape (the last partial batch) runs
eagerly. Any capture failure prints one line and the trainer continues eagerly.
"""

from __future__ import annotations

import time

import torch

from .data import Batch
from .model import ContextVectorLLM


class GraphedStep:
    def __init__(self, trainer, compile_cell: bool = False, use_graph: bool = True, fused_bptt: bool = True) -> None:
        self.t = trainer
        # use_graph=False runs the very same static-buffer step without capture (any device): the CPU
        # tests check it against the trainer's eager step.
        self.use_graph = use_graph
        self.mode = "cuda-graph" if use_graph else "static-eager"
        self.failed = not isinstance(trainer.model, ContextVectorLLM)
        self.graph = None
        self.sig = None
        self.warmup_s = 0.0
        if fused_bptt and use_graph and not compile_cell and not self.failed \
                and not trainer.model.config.context_tanh:
            # Hand-written BPTT (recurrence.py): each weight gradient one big matmul instead of T small ones.
            trainer.model.fused_bptt = True
            self.mode = "cuda-graph+bptt"
        if compile_cell and not self.failed:
            try:
                # Per-step cell compiled first: fuses the gate / LayerNorm / clamp element-wise work.
                trainer.model._cell = torch.compile(trainer.model._cell, dynamic=False)
                self.mode = "cuda-graph+compile"
            except Exception as e:  # pragma: no cover - depends on the local toolchain
                print(f"torch.compile unavailable ({type(e).__name__}: {e}); capturing the eager cell")

    def _fwd_bwd(self):
        t, s = self.t, self.static
        from .trainer import autocast, token_loss

        with autocast(t.device, t.precision):
            logits, c = t.model(s["x"], s["c"], s.get("r"))
        loss_sum, n, correct = token_loss(logits, s["y"])
        t.scaler.scale(loss_sum / n.clamp(min=1)).backward()
        return loss_sum.detach(), n, correct, c.detach()

    def _fill(self, b: Batch) -> None:
        s = self.static
        s["x"].copy_(b.x, non_blocking=True)
        s["y"].copy_(b.y, non_blocking=True)
        if "r" in s:
            s["r"].copy_(b.reset, non_blocking=True)
        if b.carry and self.t._state is not None:
            s["c"].copy_(self.t._state)
        else:
            s["c"].zero_()

    def _capture(self, b: Batch) -> None:
        t0 = time.perf_counter()
        t, dev = self.t, self.t.device
        B, T = b.x.shape
        self.static = {"x": torch.zeros(B, T, dtype=torch.long, device=dev),
                       "y": torch.zeros(B, T, dtype=torch.long, device=dev),
                       "c": torch.zeros(B, t.model.config.context_dim, device=dev)}
        if b.reset is not None:
            self.static["r"] = torch.zeros(B, T, dtype=torch.bool, device=dev)
        self._fill(b)
        self.params = [p for p in t.model.parameters() if p.requires_grad]
        self.sig = (B, T, b.reset is not None)
        if not self.use_graph:
            return
        # Warm-up and capture must not consume the RNG stream (dropout), so a resumed run, which captures
        # at a different step, draws the same random numbers as an uninterrupted one.
        rng = torch.cuda.get_rng_state(dev)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
            for _ in range(3):
                t.optimizer.zero_grad(set_to_none=True)
                self._fwd_bwd()
        torch.cuda.current_stream().wait_stream(side)
        t.optimizer.zero_grad(set_to_none=True)  # grads allocated inside the graph become static
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._fwd_bwd()
        self.grads = [p.grad for p in self.params]
        torch.cuda.synchronize()
        torch.cuda.set_rng_state(rng, dev)
        self.warmup_s = time.perf_counter() - t0

    def run(self, b: Batch):
        """Forward + backward for ``b`` via the graph; None means 'run this batch eagerly'."""
        if self.failed:
            return None
        sig = (*b.x.shape, b.reset is not None)
        if self.sig is None:  # first batch: allocate the static buffers (and capture the graph)
            try:
                self._capture(b)
            except Exception as e:
                if not self.use_graph:
                    raise
                print(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); training eagerly")
                self.failed, self.graph = True, None
                self.t.optimizer.zero_grad(set_to_none=True)
                return None
            if self.use_graph:
                print(f"fast path: {self.mode} captured for batch {sig[0]}x{sig[1]} in {self.warmup_s:.1f}s")
        elif sig != self.sig:
            return None
        else:
            self._fill(b)
        if self.use_graph:
            self.graph.replay()
            for p, g in zip(self.params, self.grads):  # an eager step in between may have replaced p.grad
                p.grad = g
            loss_sum, n, correct, c = self.out
        else:
            self.t.optimizer.zero_grad(set_to_none=True)
            loss_sum, n, correct, c = self._fwd_bwd()
        return loss_sum, n, correct, c.clone()
