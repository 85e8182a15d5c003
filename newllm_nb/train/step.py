"""One training step: forward, loss, backward, gradient clipping and the optimizer update.

Three variants compute the same function and share ``loss_and_backward`` and ``apply_update``:

* ``EagerStep``: plain PyTorch, any device and any model. Off CUDA (the CPU) a New-LLM cell that
  ``recurrence.NewLLMRecurrence`` implements runs its time loop through that hand-written BPTT: autograd
  through the loop spends most of a CPU step recording and replaying T small ops per weight, the BPTT
  only the sequential part plus one weight-gradient matmul per weight over all B·T positions.
* ``GraphedStep``: forward + loss + backward captured in one CUDA graph and replayed. A New-LLM step is
  T sequential tiny kernels per layer, so eager PyTorch is bound by kernel launches, not FLOPs;
  replaying a graph launches the whole forward + backward at once. Inside the graph the time loop runs
  as one ``recurrence`` (``recurrence.NewLLMRecurrence``: hand-written BPTT, each weight gradient one
  big matmul) unless ``fast_path="graph-autograd"`` / ``"compile"`` asks for autograd through the loop.
* ``GraphedStep`` with the fused Triton recurrence (``fused.py``), ``fast_path="fused"``.

What is captured, and why only that: forward, loss and backward (scaled by the GradScaler's device
tensor in fp16). Unscaling, the inf check, clipping and the (fused, single-kernel) Adam update stay
eager: the fp16 GradScaler may skip a step on a device flag, a decision a static graph cannot hold,
and keeping the update outside makes fp16, bf16 and fp32 share one code path, the non-finite guard
included. One graph per batch shape: an epoch's shorter last batch of independent windows replays it with
PAD rows added (they count nothing), a larger one (a run resumed on a short batch) captures again at its
size, a batch of another shape runs eagerly, and any capture failure prints one line and the step continues
eagerly.

More than one process (torchrun): each rank runs the step on its share of the global batch, then
``distributed.all_reduce_step`` averages the gradients in one flat all-reduce *after* the backward
(after the graph's replay, on the graph's static gradient buffers) and *before* ``apply_update``
unscales and clips, so every rank clips and steps on the same global gradient. The all-reduce stays
outside the graph for the reason the update does: what follows it depends on its result (a NaN loss
on any rank, summed in the same buffer, makes every rank skip the same step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import PAD_ID
from ..data.batching import Batch
from ..kernels.available import fused_kernels
from ..kernels.recurrence import NewLLMRecurrence
from ..models.build import detach_state
from ..models.newllm import NewLLM
from ..runtime.distributed import active, all_reduce_step, is_main
from ..runtime.hardware import autocast
from .metrics import token_loss

LossHook = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepResult:
    finite: bool  # False: the loss was NaN/inf and no update was made
    loss_sum: torch.Tensor  # summed cross-entropy over the batch's non-PAD targets
    n: torch.Tensor  # number of those targets
    correct: torch.Tensor
    context: object  # the carried state after this batch (detached), for the next window of a stream


def loss_and_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reset: Optional[torch.Tensor],
                      context, device: torch.device, precision: str, scaler: torch.amp.GradScaler,
                      recurrence: Optional[Callable] = None, loss_hook: Optional[LossHook] = None):
    """Forward, token-weighted loss and backward (gradients accumulate into ``.grad``).
    Returns (loss_sum, n, correct, final context), all detached."""
    with autocast(device, precision):
        if recurrence is None:
            logits, new_context = model(x, context, reset)
        else:
            logits, new_context = model(x, context, reset, recurrence=recurrence)
    loss_sum, n, correct = token_loss(logits, y)
    if loss_hook is not None:
        loss_sum = loss_hook(loss_sum)
    scaler.scale(loss_sum / n.clamp(min=1)).backward()
    return loss_sum.detach(), n, correct, detach_state(new_context)


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 clip: float, loss_sum: torch.Tensor) -> bool:
    """Unscale, clip the gradient norm to ``clip`` and step, unless the loss is not finite. Returns finiteness."""
    if not bool(torch.isfinite(loss_sum)):
        return False
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
    scaler.step(optimizer)  # fp16: skipped by the scaler if the gradients overflowed
    scaler.update()
    return True


class EagerStep:
    """``step(batch, context, clip) -> StepResult``. ``loss_hook`` (tests) may alter or poison the loss."""

    mode = "eager"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, precision: str, recurrence: Optional[Callable] = None) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.device, self.precision = device, precision
        self.loss_hook: Optional[LossHook] = None
        self.eager_recurrence = recurrence  # the whole-loop recurrence the eager step runs (None: autograd loop)
        self.eager_mode = "eager+bptt" if recurrence is not None else "eager"
        self.used = self.eager_mode  # the path the latest step took
        self.all_reduce = active()  # more than one process: average gradients across ranks each step
        self.all_params = list(model.parameters())

    def forward_backward(self, b: Batch, context) -> tuple:
        dev = self.device
        x, y = b.x.to(dev, non_blocking=True), b.y.to(dev, non_blocking=True)
        r = None if b.reset is None else b.reset.to(dev, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        return loss_and_backward(self.model, x, y, r, context if b.carry else None, dev, self.precision,
                                 self.scaler, recurrence=self.eager_recurrence, loss_hook=self.loss_hook)

    def __call__(self, b: Batch, context, clip: float) -> StepResult:
        loss_sum, n, correct, new_context = self.forward_backward(b, context)
        if self.all_reduce:  # after the backward (the graph's replay), before apply_update unscales and clips
            loss_sum, n, correct = all_reduce_step(self.all_params, loss_sum, n, correct)
        finite = apply_update(self.model, self.optimizer, self.scaler, clip, loss_sum)
        return StepResult(finite, loss_sum, n, correct, new_context)


class GraphedStep(EagerStep):
    """Forward + loss + backward through static buffers, captured in a CUDA graph (see the module docstring).

    ``use_graph=False`` runs the very same static-buffer step without capture, on any device: the CPU
    tests check it against ``EagerStep``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 device: torch.device, precision: str, recurrence: Optional[Callable] = NewLLMRecurrence.apply,
                 mode: str = "cuda-graph+bptt", use_graph: bool = True) -> None:
        super().__init__(model, optimizer, scaler, device, precision)
        self.use_graph = use_graph
        self.mode = mode if use_graph else "static-eager"
        self.failed = not isinstance(model, NewLLM)
        implements = getattr(recurrence, "implements", lambda cfg: cfg.original_cell)
        if not self.failed and recurrence is not None and not implements(model.config):
            # A cell the whole-loop recurrence does not implement runs its autograd loop in the graph.
            recurrence, self.mode = None, "cuda-graph" if use_graph else self.mode
        self.recurrence = recurrence
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.sig: Optional[tuple] = None
        self.warmup_s = 0.0

    def _static_fwd_bwd(self) -> tuple:
        s = self.static
        return loss_and_backward(self.model, s["x"], s["y"], s.get("r"), s["c"], self.device, self.precision,
                                 self.scaler, recurrence=self.recurrence)

    def _fill(self, b: Batch, context) -> None:
        s = self.static
        k = b.x.shape[0]
        s["x"][:k].copy_(b.x, non_blocking=True)
        s["y"][:k].copy_(b.y, non_blocking=True)
        if k < s["x"].shape[0]:  # a smaller batch of independent windows: the extra rows' targets count nothing
            s["x"][k:].fill_(PAD_ID)
            s["y"][k:].fill_(PAD_ID)
        if "r" in s:
            s["r"].copy_(b.reset, non_blocking=True)
        if b.carry and context is not None:
            s["c"].copy_(context)
        else:
            s["c"].zero_()

    def _capture(self, b: Batch, context) -> None:
        t0 = time.perf_counter()
        dev = self.device
        B, T = b.x.shape
        self.static = {"x": torch.zeros(B, T, dtype=torch.long, device=dev),
                       "y": torch.zeros(B, T, dtype=torch.long, device=dev),
                       "c": torch.zeros(B, self.model.config.context_dim, device=dev)}
        if b.reset is not None:
            self.static["r"] = torch.zeros(B, T, dtype=torch.bool, device=dev)
        self._fill(b, context)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
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
                self.optimizer.zero_grad(set_to_none=True)
                self._static_fwd_bwd()
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)  # grads allocated inside the graph become static
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._static_fwd_bwd()
        self.grads = [p.grad for p in self.params]
        torch.cuda.synchronize()
        torch.cuda.set_rng_state(rng, dev)
        self.warmup_s = time.perf_counter() - t0

    def forward_backward(self, b: Batch, context) -> tuple:
        if self.failed or self.loss_hook is not None:
            return self._eager(b, context)
        sig = (*b.x.shape, b.reset is not None)
        # Independent windows of the captured length fit any batch size: a smaller batch is padded into the
        # buffers; a larger one (a run resumed on an epoch's short last batch captured that first) captures again.
        windows = self.sig is not None and self._windows_of_graph_length(b)
        if self.sig is None or (windows and sig[0] > self.sig[0]):  # allocate the static buffers (and capture)
            try:
                self._capture(b, context)
            except Exception as e:
                if not self.use_graph:
                    raise
                if is_main():
                    print(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:120]}); training eagerly")
                self.failed, self.graph = True, None
                return self._eager(b, context)
            if self.use_graph and is_main():
                print(f"fast path: {self.mode} captured for batch {sig[0]}x{sig[1]} in {self.warmup_s:.1f}s")
        elif sig != self.sig and not windows:
            return self._eager(b, context)
        else:
            self._fill(b, context)
        if self.use_graph:
            self.graph.replay()
            for p, g in zip(self.params, self.grads):  # an eager step in between may have replaced p.grad
                p.grad = g
            loss_sum, n, correct, c = self.out
        else:
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, n, correct, c = self._static_fwd_bwd()
        self.used = self.mode
        return loss_sum, n, correct, c[:b.x.shape[0]].clone()

    def _windows_of_graph_length(self, b: Batch) -> bool:
        """``b`` and the captured batch are independent windows (no resets, no carried state) of one length.
        Their row counts may differ: the loss, its gradients and the token counts are sums over non-PAD
        targets, so PAD rows change nothing. Stateful batches keep their shape or run eagerly."""
        return b.reset is None and not self.sig[2] and not b.carry and b.x.shape[1] == self.sig[1]

    def _eager(self, b: Batch, context) -> tuple:
        self.used = self.eager_mode
        return super().forward_backward(b, context)


def _fused_recurrence(device: torch.device, precision: str, cfg) -> tuple[Optional[Callable], str]:
    """The Triton recurrence where it runs ``cfg``'s cell on ``device`` at ``precision``, else (None, why)."""
    fused, why = fused_kernels(device, precision)
    if fused is None:
        return None, why
    ok, cell_why = fused.fused_cell_supported(cfg)
    return (fused.fused_recurrence, why) if ok else (None, cell_why)


def make_step(fast_path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler, device: torch.device, precision: str) -> EagerStep:
    """The step for ``TrainConfig.fast_path``: eager off CUDA, for other models and for "off" (off CUDA, unless
    "off", through the hand-written BPTT where it implements the cell). On CUDA, "auto"
    takes the fused Triton kernels where they run (the cells ``fused.fused_cell_supported`` accepts, on a GPU
    Triton supports at this precision),
    else, with one printed line saying why, what "graph" captures: the hand-written BPTT in a CUDA graph.
    "fused" asks for the kernels, "graph-autograd" captures the autograd loop, "compile" a compiled cell."""
    if device.type != "cuda" or fast_path == "off" or not isinstance(model, NewLLM):
        bptt = fast_path != "off" and isinstance(model, NewLLM) and model.config.original_cell
        return EagerStep(model, optimizer, scaler, device, precision,
                         recurrence=NewLLMRecurrence.apply if bptt else None)
    args = (model, optimizer, scaler, device, precision)
    if fast_path in ("auto", "fused"):
        recurrence, why = _fused_recurrence(device, precision, model.config)
        if recurrence is not None:
            return GraphedStep(*args, recurrence=recurrence, mode="cuda-graph+fused")
        fallback = "hand-written BPTT" if model.config.original_cell else "autograd loop"
        print(f"fused kernels unavailable ({why}); using the CUDA graph + {fallback} step")
    if fast_path == "graph-autograd":
        return GraphedStep(*args, recurrence=None, mode="cuda-graph")
    if fast_path == "compile":
        try:
            model.compile_cell()
        except Exception as e:  # pragma: no cover - depends on the local toolchain
            print(f"torch.compile unavailable ({type(e).__name__}: {e}); capturing the eager cell")
            return GraphedStep(*args, recurrence=None, mode="cuda-graph")
        return GraphedStep(*args, recurrence=None, mode="cuda-graph+compile")
    return GraphedStep(*args)
