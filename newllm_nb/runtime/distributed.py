"""More than one process: rank / world helpers, start-up from torchrun's environment, the step's all-reduce,
agreement on decisions only rank 0 may take, and how a global batch is split across ranks.

PyTorch's own engine does the work: ``torchrun`` starts the processes and sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, ``torch.distributed`` moves the bytes (NCCL between GPUs, gloo
on CPU). One process is the ordinary case: every helper here is a no-op when no process group is up,
so single-process training runs exactly the code it ran before.

Data parallelism, as this package does it:

* every rank holds the whole model (identical weights: rank 0's are broadcast at start) and takes its
  share of each *global* batch (``batch_size`` is the global batch, so the original's lr rule
  ``1e-4 * sqrt(batch / 32)`` reads the same on 1 or N GPUs);
* after each rank's forward + backward (after the CUDA graph's replay) one flat all-reduce sums the
  token-weighted gradients together with the loss, token and hit counts, so every rank then unscales,
  clips and steps on the very same averaged gradient, and a NaN loss on any rank makes every rank skip
  the same step;
* validation is sharded the same way and its sums all-reduced per batch, so the printed loss / PPL is
  the whole validation set's, as one process computes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that prints, shows progress bars and writes checkpoints."""
    return rank() == 0


def launched() -> bool:
    """True when torchrun (or another launcher with the same environment) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: Optional[str] = None) -> str:
    """Join the process group torchrun describes and return this rank's device ("cpu" or "cuda:LOCAL_RANK").

    ``device`` is the ``--device`` flag: "cpu" uses gloo; None / "auto" / "cuda" use NCCL and one GPU per
    process where CUDA is present (gloo on CPU otherwise). A fixed "cuda:N" would put every rank on one
    GPU, so it is refused. Outside torchrun this returns ``device`` unchanged.
    """
    if not launched():
        return device or "auto"
    if device not in (None, "auto", "cpu", "cuda"):
        raise ValueError(f"--device {device} under torchrun: every rank would use that one device; pass "
                         f"--device cuda (one GPU per rank, by LOCAL_RANK) or --device cpu")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda under torchrun, but CUDA is not available here")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible: "
                             f"use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local)  # before NCCL starts, so each rank's communicator sits on its own GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return f"cuda:{local}" if use_cuda else "cpu"


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _object_broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed(decide: Callable[[], T], share: Callable[[T], object] = lambda r: r,
           receive: Callable[[object], T] = lambda r: r) -> T:
    """Run ``decide`` on rank 0 alone and let every rank act on its outcome.

    Rank 0 broadcasts ``share(result)`` (the other ranks turn it into their result with ``receive``), or
    the exception it raised, which every other rank then raises too: a refused run folder or a damaged
    checkpoint stops all ranks with the same message instead of leaving them waiting in a collective.
    With one process this is just ``decide()``.
    """
    if not active():
        return decide()
    if is_main():
        try:
            result = decide()
        except Exception as e:
            _object_broadcast(("error", e))
            raise
        _object_broadcast(("ok", share(result)))
        return result
    kind, payload = _object_broadcast(None)
    if kind == "error":
        payload.agreed = True  # the CLI prints it once, from rank 0
        raise payload
    return receive(payload)


def max_over_ranks(*values: int) -> list[int]:
    """Each value's maximum over the ranks, on every rank; the values themselves for one process. Rank 0
    alone sets a value it decides by its own clock ("save now"); a stop signal may reach only some ranks."""
    if not active():
        return [int(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flags = torch.tensor([int(v) for v in values], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [int(v) for v in flags.tolist()]


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` for one process."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def check_same(value, what: str) -> None:
    """Raise on every rank unless all ranks hold the same ``value`` (e.g. a hash of the data they read)."""
    if not active():
        return
    values = gather_objects(value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise ValueError(f"rank(s) {differ} hold other {what} than rank 0: every process must read the same "
                         f"files with the same settings")


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Give every rank rank 0's weights and buffers (the starting point must be identical)."""
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def all_reduce_step(params: Sequence[torch.nn.Parameter], loss_sum: torch.Tensor, n: torch.Tensor,
                    correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Average the gradients over the whole global batch and sum the step's counts, in one flat all-reduce.

    Each rank's backward gave the gradient of *its* mean loss ``loss_sum_r / n_r``. One process over the
    global batch takes the gradient of ``sum_r loss_sum_r / N``, so each rank's gradient is weighted by
    its token count: ``grad = sum_r n_r * grad_r / N``. That keeps the update identical to one process
    even when ranks hold different numbers of non-PAD targets (padding, a short last batch). The loss,
    token and hit counts travel in the same buffer; a non-finite loss on any rank makes the summed loss
    non-finite on every rank, so all skip the step together. Gradients are rewritten in place, so the
    CUDA graph's static gradient buffers stay the ones the next replay writes.
    """
    grads = [p.grad for p in params if p.grad is not None]
    weight = n.to(torch.float32)
    counts = torch.stack([loss_sum.float(), n.float(), correct.float()])
    flat = torch.cat([g.reshape(-1).float() * weight for g in grads] + [counts.to(grads[0].device if grads
                                                                                    else counts.device)])
    dist.all_reduce(flat)
    total = flat[-2]
    flat_grads = flat[:-3] / total.clamp(min=1)
    offset = 0
    for g in grads:
        k = g.numel()
        g.copy_(flat_grads[offset:offset + k].view_as(g))
        offset += k
    return flat[-3], total.to(n.dtype), flat[-1].to(correct.dtype)


def all_reduce_sums(*values: torch.Tensor) -> list[torch.Tensor]:
    """The element-wise sum over ranks of a few scalar tensors (one all-reduce)."""
    if not active():
        return list(values)
    buf = torch.stack([v.detach().double() for v in values])
    dist.all_reduce(buf)
    return [b.to(v.dtype) for b, v in zip(buf, values)]


# -- splitting a global batch -----------------------------------------------------------------------------
def window_rows(idx: torch.Tensor, rank_: int, world: int) -> torch.Tensor:
    """This rank's rows of one global batch of windows: every ``world``-th from ``rank_`` (the split
    ``DistributedSampler`` makes of a shuffled order, taken batch by batch). Empty when the batch is
    shorter than the rank number (the caller then feeds a row whose targets are all padding)."""
    return idx if world == 1 else idx[rank_::world]


def stream_rows(num_streams: int, rank_: int, world: int) -> range:
    """This rank's block of the parallel streams (a contiguous block, so the carried context of all ranks
    put together in rank order is the global batch's)."""
    if num_streams < world:
        raise ValueError(f"{num_streams} parallel stream(s) cannot be shared by {world} processes: use a larger "
                         f"--batch-size, more data, or fewer processes")
    base, extra = divmod(num_streams, world)
    start = rank_ * base + min(rank_, extra)
    return range(start, start + base + (1 if rank_ < extra else 0))


def _batch_dim(state) -> int:
    # New-LLM's context is [B, C]; an LSTM's (h, c) are [layers, B, H] each.
    return 0 if torch.is_tensor(state) else 1


def gather_state(state):
    """Every rank's carried context joined in rank order (the whole global batch's, as one process holds
    it), for a checkpoint; the same on every rank. None stays None."""
    if state is None or not active():
        return state
    parts = (state,) if torch.is_tensor(state) else tuple(state)
    dim = _batch_dim(state)
    sizes = [torch.zeros(1, dtype=torch.long, device=parts[0].device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([parts[0].shape[dim]], device=parts[0].device))
    most = int(max(s.item() for s in sizes))
    joined = []
    for p in parts:
        pad = list(p.shape)
        pad[dim] = most - p.shape[dim]
        padded = torch.cat([p, p.new_zeros(pad)], dim).contiguous()
        out = [torch.empty_like(padded) for _ in range(world_size())]
        dist.all_gather(out, padded)
        joined.append(torch.cat([o.narrow(dim, 0, int(s.item())) for o, s in zip(out, sizes)], dim))
    return joined[0] if torch.is_tensor(state) else tuple(joined)


def shard_state(state, rank_: int, world: int):
    """This rank's part of a whole global batch's carried context (the inverse of ``gather_state``)."""
    if state is None or world == 1:
        return state
    dim = _batch_dim(state)
    parts = (state,) if torch.is_tensor(state) else tuple(state)
    rows = stream_rows(parts[0].shape[dim], rank_, world)
    cut = [p.narrow(dim, rows.start, len(rows)).contiguous() for p in parts]
    return cut[0] if torch.is_tensor(state) else tuple(cut)
