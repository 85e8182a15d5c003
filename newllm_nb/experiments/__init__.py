"""What the CLI and the notebooks run: the config-to-trained-model pipeline (experiment), the layer sweep,
context growth, independent runs side by side (parallel), what the context remembers (memory) and the
throughput probe (bench)."""

from .experiment import RunResult, keyed_run_dir, run_experiment
from .sweep import run_sweep

__all__ = ["RunResult", "keyed_run_dir", "run_experiment", "run_sweep"]
