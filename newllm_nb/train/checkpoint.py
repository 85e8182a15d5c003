"""Checkpoints: one safetensors file holding weights, optimizer tensors and RNG state, with the run's
config, tokenizer, history and trainer state as JSON in its metadata. Nothing is unpickled on load.

``load_checkpoint`` and ``load_model`` also take a shared model (a folder from ``hub.HubModel.save_pretrained``:
its ``model.safetensors`` is a checkpoint of the weights alone, checked against ``config.json`` and
``tokenizer.json``), and ``load_model`` a hub id ``owner/name[@revision]`` (hub_files.py).

Writes are atomic (temp file in the same folder, fsync, ``os.replace``), so a crash or a Colab
disconnect never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from ..config import RunConfig
from ..data.tokenizer import tokenizer_from_hub_json, tokenizer_from_json, tokenizer_hash
from ..models.build import build_model
from ..runtime.files import atomic_write, check_regular_file
from ..runtime.hardware import resolve_device
from ..runtime.hashing import tensor_sha256
from .hub_files import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, locate

FORMAT = "newllm_nb/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, foreign, or does not fit the model."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose bytes are not what was written (truncated, overwritten, bit rot)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, a folder gone); nothing under its name changed."""


def _write_failure(e: BaseException) -> str:
    """The OS's reason for a failed write; safetensors wraps it in its own error text."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    if "StorageFull" in text or "code: 28" in text:
        return "No space left on device"
    if "QuotaExceeded" in text or "code: 122" in text:
        return "Disk quota exceeded"
    return " ".join(text.splitlines())[:200]


def _checksum(tensors: dict, meta_json: str) -> str:
    """SHA-256 over every tensor (names, shapes, dtypes, bytes, in name order) and the metadata JSON."""
    names = sorted(tensors)
    body = tensor_sha256(*[tensors[k] for k in names])
    return hashlib.sha256("\n".join([body, meta_json, *names]).encode()).hexdigest()


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    tensors, meta_state = {}, {}
    for idx, st in sd["state"].items():
        meta_state[str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta_state[str(idx)][k] = v
    groups = [{k: (v.item() if torch.is_tensor(v) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"state": meta_state, "param_groups": groups}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {int(i): dict(v) for i, v in meta["state"].items()}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Union[str, Path], model: torch.nn.Module, *, config: dict, tokenizer=None,
                    history: Optional[list] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                    scaler=None, trainer_state: Optional[dict] = None, extra_tensors: Optional[dict] = None,
                    fingerprint: Optional[dict] = None, data_source: str = "", before_replace=None) -> Path:
    """Write one checkpoint atomically, with a SHA-256 of its contents. Everything needed to chat or resume
    travels in this file; ``fingerprint`` (runs.run_fingerprint) says which configuration wrote it and
    ``data_source`` where its text came from (a bundled sample says so). ``before_replace`` runs once the new
    file is complete (files.atomic_write). A failed write raises ``CheckpointWriteError`` and leaves any file
    already at ``path`` untouched."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"format": FORMAT, "config": config, "history": history or [],
                            "trainer_state": trainer_state or {}}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.to_json()
    if fingerprint is not None:
        meta["fingerprint"] = fingerprint
    if data_source:
        meta["data_source"] = data_source
    if optimizer is not None:
        opt_t, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_t)
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = scaler.state_dict()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
    write_checkpoint(path, tensors, meta, before_replace)
    return Path(path)


def write_checkpoint(path: Union[str, Path], tensors: dict, meta: dict, before_replace=None) -> str:
    """Write ``tensors`` (CPU, contiguous, named as ``save_checkpoint`` names them) with ``meta`` atomically;
    returns the SHA-256 written with them."""
    meta_json = json.dumps(meta)
    metadata = {"newllm_nb": meta_json, "sha256": _checksum(tensors, meta_json)}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), before_replace)
    except (OSError, SafetensorError) as e:
        raise CheckpointWriteError(f"could not write {path} ({_write_failure(e)})") from e
    return metadata["sha256"]


class Checkpoint:
    """What ``load_checkpoint`` returns: tensors and parsed metadata, no model built yet."""

    def __init__(self, path: Path, tensors: dict, meta: dict, sha256: Optional[str] = None) -> None:
        self.path, self.tensors, self.meta, self.sha256 = path, tensors, meta, sha256

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def fingerprint(self) -> Optional[dict]:
        """The configuration that wrote it (runs.run_fingerprint), where recorded."""
        return self.meta.get("fingerprint")

    @property
    def data_source(self) -> str:
        """Where the training text came from (sources.py's source string), or '' where not recorded."""
        return self.meta.get("data_source", "")

    @property
    def history(self) -> list:
        return self.meta.get("history", [])

    @property
    def trainer_state(self) -> dict:
        return self.meta.get("trainer_state", {})

    def model_state(self) -> dict:
        return {k[len("model."):]: v for k, v in self.tensors.items() if k.startswith("model.")}

    def tokenizer(self):
        if "tokenizer" not in self.meta:
            raise CheckpointError(f"{self.path}: checkpoint carries no tokenizer")
        return tokenizer_from_json(self.meta["tokenizer"])

    def optimizer_state(self) -> Optional[dict]:
        return _unflatten_optimizer(self.tensors, self.meta["optimizer"]) if "optimizer" in self.meta else None

    def extra(self, name: str) -> Optional[torch.Tensor]:
        return self.tensors.get(f"extra.{name}")

    def restore_rng(self) -> None:
        if "rng.cpu" in self.tensors:
            torch.set_rng_state(self.tensors["rng.cpu"])
        cuda = [self.tensors[k] for k in sorted(self.tensors) if k.startswith("rng.cuda.")]
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

    def load_into(self, model: torch.nn.Module) -> None:
        """Load weights, raising CheckpointError that names every missing / unexpected / misshapen tensor."""
        state = self.model_state()
        own = model.state_dict()
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        problems += [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                     for k, v in own.items() if k in state and state[k].shape != v.shape]
        if problems:
            raise CheckpointError(f"{self.path} does not fit this model ({len(problems)} problem(s)): "
                                  + "; ".join(problems[:6]))
        model.load_state_dict(state)


def peek_checkpoint(path: Union[str, Path]) -> Optional[dict]:
    """A checkpoint's metadata (config, fingerprint, trainer state, history) read from its header alone, without
    its tensors or checksum; None for a file that is not a readable newllm_nb checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["newllm_nb"])
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError):
        return None
    return meta if isinstance(meta, dict) else None


def load_checkpoint(path: Union[str, Path]) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; CheckpointError names the file and the problem."""
    p = Path(path)
    if p.is_dir() and (p / WEIGHTS_FILE).exists():
        return _load_shared(p)
    if p.is_dir():  # a run folder means its best weights; never another file in their place
        if not (p / "best.safetensors").exists():
            last = p / "last.safetensors"
            there = (f": {last} is there, holding the last epoch's weights, not the best; pass that file to use them"
                     if last.exists() else "")
            raise CheckpointError(f"no best.safetensors in {p}{there}")
        p = p / "best.safetensors"
    check_regular_file(p, "checkpoint", None, CheckpointError)  # a pipe or device is refused before reading
    if p.stat().st_size < 16:
        raise DamagedCheckpointError(f"{p} is truncated or empty ({p.stat().st_size} bytes)")
    try:
        # One read of the file: a `last` rotated in between two opens would pair one file's metadata with
        # another's tensors.
        blob = p.read_bytes()
        header_len = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8:8 + header_len]).get("__metadata__") or {}
        tensors = load_bytes(blob)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DamagedCheckpointError(f"{p} is not a readable safetensors checkpoint (truncated or foreign file): "
                                     f"{e}") from e
    if "newllm_nb" not in metadata:
        raise CheckpointError(f"{p} is a safetensors file but not a newllm_nb checkpoint (no metadata)")
    try:
        meta = json.loads(metadata["newllm_nb"])
    except ValueError as e:
        raise DamagedCheckpointError(f"{p}: checkpoint metadata is corrupt: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: checkpoint metadata is a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{p}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    if "sha256" in metadata and _checksum(tensors, metadata["newllm_nb"]) != metadata["sha256"]:
        raise DamagedCheckpointError(f"{p} is damaged: its contents do not match the SHA-256 written with it")
    return Checkpoint(p, tensors, meta, metadata.get("sha256"))


def _load_shared(folder: Path) -> Checkpoint:
    """A shared model's folder: its weights file, and the config.json and tokenizer.json that must describe it."""
    ckpt = load_checkpoint(folder / WEIGHTS_FILE)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        tokenizer = tokenizer_from_hub_json((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} is not a complete shared model: no {Path(e.filename).name}") from None
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    if not isinstance(config, dict) or config.get("checkpoint_sha256") != ckpt.sha256 or \
            {k: config.get(k) for k in ckpt.config} != ckpt.config:
        raise CheckpointError(f"{folder}/{CONFIG_FILE} does not describe {WEIGHTS_FILE} (another model's config, or "
                              "edited): share the model again")
    if "tokenizer" not in ckpt.meta or tokenizer_hash(tokenizer) != tokenizer_hash(ckpt.tokenizer()):
        raise CheckpointError(f"{folder}/{TOKENIZER_FILE} is not the tokenizer {WEIGHTS_FILE} was trained with")
    return ckpt


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu", revision: Optional[str] = None):
    """Build the model a checkpoint describes and load its weights. Returns (model, tokenizer, checkpoint).

    ``path``: a checkpoint file, a run folder, a shared model's folder, or a hub id ``owner/name`` (optionally
    ``owner/name@revision``, or ``revision=``), which is downloaded to the Hugging Face cache first.
    The model remembers its tokenizer's hash (``tokenizer_sha256``), so generation can refuse another one."""
    device = resolve_device(str(device))  # a device that is not there: one clear line, before any work
    ckpt = load_checkpoint(locate(path, revision))
    try:
        cfg = RunConfig.from_dict(ckpt.config)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: config in checkpoint is invalid: {e}") from e
    model = build_model(cfg.model)
    ckpt.load_into(model)
    tokenizer = ckpt.tokenizer()
    model.tokenizer_sha256 = tokenizer_hash(tokenizer)
    return model.to(device).eval(), tokenizer, ckpt
