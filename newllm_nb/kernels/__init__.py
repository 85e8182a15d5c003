"""The New-LLM cell: its literal reference (reference), the same function fast: the hand-written BPTT
(recurrence, its products through oneDNN on CPU: linear) and the Triton kernels (fused, optional: import it
only where Triton may be missing), and what every decoder shares (decoding)."""

from . import reference
from .decoding import capture_graph, prime, sample_ids
from .linear import linear
from .recurrence import NewLLMRecurrence

__all__ = ["NewLLMRecurrence", "capture_graph", "linear", "prime", "reference", "sample_ids"]
