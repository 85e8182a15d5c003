"""The New-LLM cell: its literal reference (reference), the same function fast: the hand-written BPTT
(recurrence) and the Triton kernels (fused, optional: import it only where Triton may be missing), and what
every decoder shares (decoding)."""

from . import reference
from .decoding import capture_graph, prime, sample_ids
from .recurrence import NewLLMRecurrence

__all__ = ["NewLLMRecurrence", "capture_graph", "prime", "reference", "sample_ids"]
