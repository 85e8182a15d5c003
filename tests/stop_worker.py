"""Subprocess body for the stop-signal tests: the CLI (``python -m newllm_nb ARGS``) with every training step
slowed by SLEEP seconds, so a test can send a signal mid-epoch. Usage: stop_worker.py SLEEP ARGS..."""

import sys
import time

import newllm_nb.train.trainer as trainer
from newllm_nb.cli import main


def slowed(make_step):
    def make(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def slow(*a, **kw):
            out = step(*a, **kw)
            time.sleep(SLEEP)
            return out
        return slow
    return make


if __name__ == "__main__":
    SLEEP = float(sys.argv[1])
    if SLEEP:
        trainer.make_step = slowed(trainer.make_step)
    sys.exit(main(sys.argv[2:]))
