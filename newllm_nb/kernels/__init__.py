"""The New-LLM recurrence written for speed: the hand-written BPTT (recurrence), what every decoder shares
(decoding) and the Triton kernels (fused, optional: import it only where Triton may be missing)."""

from .decoding import capture_graph, prime, sample_ids
from .recurrence import NewLLMRecurrence

__all__ = ["NewLLMRecurrence", "capture_graph", "prime", "sample_ids"]
