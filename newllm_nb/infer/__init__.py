"""Using a trained model: sampling, the graph and fused decoders, streaming text and chat (generate)."""

from .generate import ChatSession, Sampling, generate, generate_batch, stream

__all__ = ["ChatSession", "Sampling", "generate", "generate_batch", "stream"]
