"""The machine under a run: device, precision and batch for it (hardware), processes under torchrun
(distributed), stopping on a signal with the work kept (stopping), crash-safe file writes (files) and
content hashes (hashing). Exports the names the layers above use most."""

from .distributed import init_from_env, is_main, launched, rank, world_size
from .files import atomic_write, atomic_write_text
from .hardware import autocast, detect, recommend, resolve_device, resolve_precision

__all__ = ["atomic_write", "atomic_write_text", "autocast", "detect", "init_from_env", "is_main", "launched", "rank",
           "recommend", "resolve_device", "resolve_precision", "world_size"]
