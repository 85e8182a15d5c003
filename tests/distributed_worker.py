"""Body of test_distributed's runs: a tiny model trained on the bundled sample, as one process or as one
rank of a torchrun launch (gloo, CPU). Rank 0 writes the history and the final weights to OUT.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py MODE RUN_DIR SLEEP OUT
"""

import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from newllm_nb import preset  # noqa: E402
from newllm_nb.config import apply_overrides  # noqa: E402
from newllm_nb.data import prepare  # noqa: E402
from newllm_nb.models.build import build_model  # noqa: E402
from newllm_nb.runtime.distributed import init_from_env, is_main, shutdown  # noqa: E402
from newllm_nb.runtime.stopping import Interrupted  # noqa: E402
from newllm_nb.train.trainer import Trainer  # noqa: E402

# Global batch 16 windows (8 per rank) / 8 parallel streams (4 per rank); no dropout, so one process
# and two compute the same function of the same global batches.
CONFIGS = {
    "windows": dict(data__mode="windows", train__batch_size=16),
    "stream": dict(data__mode="stream", train__batch_size=8),
}


def config(mode: str, run_dir: str, device: str = "cpu"):
    return preset("smoke", model__vocab_size=200, model__embed_dim=16, model__context_dim=16, model__hidden_dim=32,
                  model__dropout=0.0, data__max_seq_length=16, data__max_examples=60, train__lr=5e-3,
                  train__epochs=3, train__patience=10, train__device=device, train__precision="fp32",
                  train__checkpoint_every_minutes=float(os.environ.get("NEWLLM_TEST_CHECKPOINT_MINUTES", 0.002))
                  if run_dir else 30.0, **CONFIGS[mode])


def train(mode: str, run_dir: str = "", sleep: float = 0.0) -> tuple[list, dict]:
    """(history, final weights) of one run; under torchrun, this rank's part of it. NEWLLM_TEST_DEVICE=cuda:
    one GPU per rank through NCCL (and the CUDA-graph step), else CPU and gloo."""
    device = init_from_env(os.environ.get("NEWLLM_TEST_DEVICE", "cpu"))
    torch.set_num_threads(1)
    cfg = config(mode, run_dir, device)
    p = prepare(cfg.data, 200)
    cfg = apply_overrides(cfg, model__vocab_size=p.tokenizer.vocab_size)
    torch.manual_seed(cfg.train.seed)
    t = Trainer(build_model(cfg.model), p.train, p.valid, cfg, p.tokenizer, run_dir or None)
    if sleep:  # slow each step so the test can kill the ranks mid-epoch
        t.step.loss_hook = lambda loss: (time.sleep(sleep), loss)[1]
    history = t.fit()
    return history, {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def main(mode: str, run_dir: str, sleep: float, out: str) -> None:
    try:
        history, weights = train(mode, run_dir, sleep)
    except Interrupted as e:  # every rank stops at the same step; rank 0 saved it and says so
        if is_main():
            print(e.message(), flush=True)
        shutdown()
        sys.exit(e.exit_code)
    if is_main():
        torch.save(weights, out + ".pt")
        with open(out, "w") as f:
            json.dump(history, f)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
