"""Text in, batches out: sources (local, hub, bundled sample), any corpus read as a stream (corpus), tokenizers,
the token cache on disk (token_cache, token_data), the instruction prompt format, batching, and ``prepare``
(pipeline), the one call from a DataConfig to train / valid datasets and a tokenizer."""

from .batching import Batch, StreamData, WindowData
from .pipeline import Prepared, prepare
from .sources import DataError
from .tokenizer import BPETokenizer, Tokenizer, WordTokenizer, load_tokenizer

__all__ = ["BPETokenizer", "Batch", "DataError", "Prepared", "StreamData", "Tokenizer", "WindowData",
           "WordTokenizer", "load_tokenizer", "prepare"]
