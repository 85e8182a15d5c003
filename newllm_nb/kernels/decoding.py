"""What every decoder shares: reading a prompt into the context, graph-safe sampling, and graph capture."""

from __future__ import annotations

from typing import Callable, Optional

import torch


@torch.no_grad()
def prime(model, ids: torch.Tensor, context: Optional[torch.Tensor] = None, chunk: int = 2048
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``ids`` [B, T] (T >= 1) in chunks; return (logits at the last position [B, V], context)."""
    if ids.shape[1] == 0:
        raise ValueError("cannot prime on an empty prompt")
    logits = None
    for i in range(0, ids.shape[1], chunk):
        logits, context = model(ids[:, i:i + chunk], context)
    return logits[:, -1], context


def sample_ids(lg: torch.Tensor, temperature: float, g: Optional[torch.Generator] = None) -> torch.Tensor:
    """Greedy at temperature 0, else Gumbel-max sampling: no host sync and no data-dependent shapes, so it
    can sit inside a captured CUDA graph (drawing from the default generator when ``g`` is None)."""
    if temperature == 0:
        return lg.argmax(-1)
    u = torch.rand(lg.shape, device=lg.device, generator=g).clamp_(1e-10, 1.0)
    t = min(max(float(temperature), 1e-30), 1e30)  # generate.SCALE_MIN / SCALE_MAX: float32 stays finite
    lg = lg.float()
    return ((lg - lg.amax(-1, keepdim=True)) / t - torch.log(-torch.log(u))).argmax(-1)


def capture_graph(body: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Run ``body`` once on a side stream (compiles kernels, warms the allocator), then capture it in a graph.
    ``body`` runs twice for real: callers save and restore the state it advances."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


class ChunkDecoder:
    """What the captured decoders share (``generate.GraphDecoder``, ``fused.FusedDecoder``): prime the context
    on the prompt, then run ``chunk`` single-token steps at a time (one CUDA-graph replay, or the same steps
    uncaptured with ``use_graph=False``) until ``max_new_tokens`` ids have left for host memory.

    A subclass sets ``model, B, chunk, temperature, use_graph``, the device tensors ``tok`` [B] (the next input)
    and ``out`` [B, chunk] (the ids of one chunk), ``graph = None``, and defines ``_start(context)`` (load the
    primed context), ``_body()`` (one chunk of steps) and ``_capture()`` (capture ``_body`` into ``graph``)."""

    @torch.no_grad()
    def run(self, prompt_ids: torch.Tensor, max_new_tokens: int, seed: int = 0) -> torch.Tensor:
        """Token ids [B, max_new_tokens] on the CPU after ``prompt_ids`` [B, T] (T >= 1)."""
        logits, ctx = prime(self.model, prompt_ids.to(self.tok.device))
        cuda = self.tok.device.type == "cuda"
        if cuda:
            torch.cuda.manual_seed(seed)  # sampling draws from the default CUDA generator (philox offsets)
        else:
            torch.manual_seed(seed)
        self.tok.copy_(sample_ids(logits, self.temperature))
        self._start(ctx)
        if self.use_graph and self.graph is None:
            self._capture()
        out = torch.empty(self.B, max_new_tokens, dtype=torch.long, pin_memory=cuda)
        for i in range(0, max_new_tokens, self.chunk):
            if self.use_graph:
                self.graph.replay()
            else:
                self._body()
            n = min(self.chunk, max_new_tokens - i)
            out[:, i:i + n].copy_(self.out[:, :n], non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
        return out
