"""Independent runs side by side: a pool of worker processes per visible GPU (a sweep's runs, a benchmark's
seeds), each worker showing its process one card. Training across GPUs is ``runtime.distributed``'s job."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Callable, Optional

import torch


def _only_gpu(gpu: Optional[int]) -> None:
    """Worker initializer: show this process one GPU (it runs before CUDA starts in the worker)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def spread(fn: Callable, calls: Sequence[tuple], jobs: int, on_done: Optional[Callable[[int, object], None]] = None,
           gpus: Optional[int] = None) -> list:
    """``fn(*call)`` for every call, ``jobs`` at a time in worker processes spread over the visible GPUs.

    One pool of worker processes per GPU (each worker sees only its own card, as ``cuda:0``), calls dealt
    out in turn, ``-(-jobs // gpus)`` workers per GPU (one when ``jobs`` equals the GPU count); on a
    machine without GPUs, ``jobs`` CPU workers. Returns the results in the calls' order; a call that
    raised (or whose worker died) gives its exception instead, so one failed run loses none of the others.
    ``on_done(index, result)`` is called as each finishes, in the parent.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    gpus = torch.cuda.device_count() if gpus is None else gpus
    pools = [ProcessPoolExecutor(max(1, -(-jobs // max(gpus, 1))), mp_context=mp.get_context("spawn"),
                                 initializer=_only_gpu, initargs=(g if gpus > 1 else None,))
             for g in range(max(gpus, 1))]
    results: list = [None] * len(calls)
    try:
        futures = {pools[k % len(pools)].submit(fn, *c): k for k, c in enumerate(calls)}
        for f in as_completed(futures):
            k = futures[f]
            try:
                results[k] = f.result()
            except Exception as e:  # the run's own error, or BrokenProcessPool when its worker died
                results[k] = e
            if on_done is not None:
                on_done(k, results[k])
    except BaseException:  # stopped (Ctrl-C, SIGTERM): each worker saves its run at the step it is on
        for pool in pools:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                if proc.is_alive():
                    proc.terminate()  # SIGTERM, which a training worker turns into "save and stop"
        raise
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)
    return results
