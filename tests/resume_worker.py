"""Subprocess body for test_resume_kill: train a tiny model into RUN_DIR, checkpointing often."""

import json
import sys
import time

import torch

from newllm_nb import NewLLM, preset
from newllm_nb.config import apply_overrides
from newllm_nb.data import prepare
from newllm_nb.train.runs import RunFolderError
from newllm_nb.train.trainer import Trainer


def main(run_dir: str, sleep: float, out: str) -> None:
    cfg = preset("smoke", model__vocab_size=200, model__embed_dim=16, model__context_dim=16, model__hidden_dim=32,
                 data__max_seq_length=16, data__max_examples=60, data__mode="stream", train__batch_size=8,
                 train__lr=5e-3, train__epochs=3, train__patience=10, train__checkpoint_every_minutes=0.002)
    p = prepare(cfg.data, 200)
    cfg = apply_overrides(cfg, model__vocab_size=p.tokenizer.vocab_size)
    torch.manual_seed(cfg.train.seed)
    t = Trainer(NewLLM(cfg.model), p.train, p.valid, cfg, p.tokenizer, run_dir or None)
    if sleep:
        t.step.loss_hook = lambda loss: (time.sleep(sleep), loss)[1]
    try:
        hist = t.fit()
    except RunFolderError as e:  # another process holds the folder
        print(e, file=sys.stderr)
        sys.exit(3)
    with open(out, "w") as f:
        json.dump(hist, f)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
