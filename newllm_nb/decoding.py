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
