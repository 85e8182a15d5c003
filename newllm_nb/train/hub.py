"""Share a trained model on the Hugging Face Hub, and load anyone's, through ``huggingface_hub``'s
``PyTorchModelHubMixin``: ``HubModel.save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

A shared model is one folder (hub_files.py names the files): ``model.safetensors`` is a checkpoint of the
weights alone, carrying the run's config, tokenizer, history, data source and fingerprint with a SHA-256
(checkpoint.py reads and checks it, nothing is unpickled); ``config.json`` repeats the config, the
fingerprint and that SHA-256 where the hub shows them; ``tokenizer.json`` is the tokenizer in the
``tokenizers`` format; ``README.md`` is the model card. Uploading is the mixin's; this module checks first
that there is a token, that the repo id is well formed, and that the repo does not hold another model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch.nn as nn
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin, get_token
from huggingface_hub.repocard_data import EvalResult

from ..config import ModelConfig, RunConfig
from ..data.tokenizer import tokenizer_hash
from ..models.build import build_model
from ..models.newllm import count_parameters
from ..repository import REPOSITORY, clone_url
from ..runtime.files import atomic_write_text
from .checkpoint import FORMAT, Checkpoint, CheckpointError, load_checkpoint, write_checkpoint
from .hub_files import (
    CARD_FILE,
    CONFIG_FILE,
    LOGIN_HELP,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    HubError,
    check_repo_id,
    fetch,
    hub_errors,
    hub_offline,
    locate,
    parse_hub_id,
)
from .runs import fingerprint_id

TAGS = ["newllm", "attention-free", "recurrent", "context-vector", "text-generation"]
# Metadata the weights file keeps for a shared model; resume-only state (optimizer, RNG, trainer) stays home.
PRIVATE_META = ("optimizer", "scaler", "trainer_state")


class HubModel(nn.Module, PyTorchModelHubMixin, library_name="newllm-nb", repo_url=clone_url(REPOSITORY),
               pipeline_tag="text-generation", tags=TAGS):
    """A trained model with its tokenizer and its run's record, as the hub shares it.

    ``HubModel.from_checkpoint(path)`` wraps a checkpoint; ``HubModel.from_pretrained("owner/name")`` (or a
    saved folder, ``revision=`` for a branch, tag or commit) loads a shared one, checked like a local file.
    ``.model`` is the language model, ``.tokenizer`` its tokenizer, ``.checkpoint`` the record."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        try:
            self.run_config = RunConfig.from_dict({k: config[k] for k in ("model", "data", "train") if k in config})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json is not a newllm_nb config: {e}") from None
        self.model = build_model(self.run_config.model)
        self.tokenizer = None
        self.checkpoint: Optional[Checkpoint] = None
        self.shared_sha256: Optional[str] = None  # of the weights file save_pretrained wrote last

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, source: Union[str, Path, Checkpoint], revision: Optional[str] = None) -> HubModel:
        """From a checkpoint file, a run folder, a shared folder or a hub id (as ``checkpoint.load_model``)."""
        ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(locate(source, revision))
        self = cls(_hub_config(ckpt))
        ckpt.load_into(self.model)
        self.tokenizer = ckpt.tokenizer()
        self.model.tokenizer_sha256 = tokenizer_hash(self.tokenizer)  # generation refuses another tokenizer
        self.checkpoint = ckpt
        return self.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Path], *, revision: Optional[str] = None,
                        **kwargs) -> HubModel:
        """A saved folder, or a hub id ``owner/name`` (``owner/name@revision`` or ``revision=``)."""
        source = str(pretrained_model_name_or_path)
        if Path(source).is_dir():
            return super().from_pretrained(source, **kwargs)
        parsed = parse_hub_id(source)
        if parsed is None:
            raise HubError(f"{source!r} is neither a folder nor a hub id OWNER/NAME[@revision]")
        repo, rev = parsed
        with hub_errors(repo, rev or revision, not_local=True):
            return super().from_pretrained(repo, revision=rev or revision, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", **model_kwargs) -> HubModel:
        # The mixin has read config.json into model_kwargs; the weights file's own record is what counts, and
        # load_checkpoint checks config.json and tokenizer.json against it.
        folder = Path(model_id) if Path(model_id).is_dir() else fetch(
            model_id, revision, cache_dir=cache_dir, token=token, force_download=force_download,
            local_files_only=local_files_only)
        return cls.from_checkpoint(load_checkpoint(folder)).to(map_location)

    # -- saving --------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, Path], **kwargs) -> Optional[str]:
        """Write the shared folder. A folder holding anything but this same run's shared files is refused."""
        folder = Path(save_directory)
        _check_folder(folder, self.identity)
        (folder / CARD_FILE).unlink(missing_ok=True)  # the mixin keeps an existing card; this one is new
        return super().save_pretrained(folder, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        if self.checkpoint is None or self.tokenizer is None:
            raise CheckpointError("nothing to share: build the HubModel with HubModel.from_checkpoint(path)")
        meta = {k: v for k, v in self.checkpoint.meta.items() if k not in PRIVATE_META}
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        self.shared_sha256 = sha = write_checkpoint(save_directory / WEIGHTS_FILE, tensors, meta)
        atomic_write_text(save_directory / TOKENIZER_FILE, self.tokenizer.to_hub_json())
        config = {**_hub_config(self.checkpoint), "checkpoint_sha256": sha}
        atomic_write_text(save_directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))

    def generate_model_card(self, *args, repo_id: Optional[str] = None, **kwargs) -> ModelCard:
        return model_card(self, repo_id)

    # -- what it is ----------------------------------------------------------------------------------
    @property
    def identity(self) -> str:
        """Which run this is: the fingerprint id, or the checkpoint's SHA-256 where no fingerprint was kept."""
        ckpt = self.checkpoint
        if ckpt is not None and ckpt.fingerprint:
            return f"run {fingerprint_id(ckpt.fingerprint)}"
        return f"checkpoint {(ckpt.sha256 or 'unknown')[:10]}" if ckpt is not None else "unknown"


def _hub_config(ckpt: Checkpoint) -> dict:
    """config.json: the run config, which code reads it, and the fingerprint."""
    cfg = ckpt.config
    return {"format": FORMAT, "architecture": cfg.get("model", {}).get("arch", "newllm"), **cfg,
            "fingerprint": ckpt.fingerprint, "checkpoint_sha256": ckpt.sha256}


def _folder_identity(folder: Path) -> Optional[str]:
    """The run a shared folder holds ("run <id>" / "checkpoint <sha>"), None when it holds no shared config."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _config_identity(config)


def _config_identity(config) -> Optional[str]:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        return None
    if config.get("fingerprint"):
        return f"run {fingerprint_id(config['fingerprint'])}"
    return f"checkpoint {str(config.get('checkpoint_sha256'))[:10]}"


def _check_folder(folder: Path, identity: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise HubError(f"{folder} is a file, not a folder: choose another --local-dir")
    if not folder.exists() or not any(folder.iterdir()):
        return
    there = _folder_identity(folder)
    if there != identity:
        what = f"another model ({there})" if there else "other files"
        raise HubError(f"{folder} already holds {what}: choose an empty or new folder")


# ---------------------------------------------------------------------------------------------------
# Sharing
# ---------------------------------------------------------------------------------------------------
def push(checkpoint: Union[str, Path, Checkpoint], repo: str, local_dir: Union[str, Path, None] = None, *,
         revision: Optional[str] = None, token: Optional[str] = None, private: Optional[bool] = None) -> str:
    """Share a checkpoint as ``repo`` (``OWNER/NAME``). With ``local_dir``: write the folder that would be
    uploaded, and upload nothing. Returns the folder, or the address of the uploaded model."""
    repo = check_repo_id(repo)
    shared = HubModel.from_checkpoint(checkpoint, revision)
    if local_dir is not None:
        shared.save_pretrained(local_dir, model_card_kwargs={"repo_id": repo})
        return str(local_dir)
    if hub_offline():
        raise HubError("cannot push: the hub is offline (HF_HUB_OFFLINE=1); unset it, or write the folder with "
                       "--local-dir DIR and upload it later")
    token = token or get_token()
    if not token:
        raise HubError(f"cannot push to {repo}: no Hugging Face token; {LOGIN_HELP}")
    _check_remote(repo, shared.identity, token)
    with hub_errors(repo):
        shared.push_to_hub(repo, token=token, private=private, model_card_kwargs={"repo_id": repo},
                           commit_message=f"newllm-nb: {shared.identity}")
    return f"https://huggingface.co/{repo}"


def _check_remote(repo: str, identity: str, token: str) -> None:
    """Refuse a repo that already holds another model (or anything that is not a newllm_nb model)."""
    from huggingface_hub import HfApi, errors, hf_hub_download

    with hub_errors(repo):
        try:
            info = HfApi(token=token).model_info(repo)
        except errors.RepositoryNotFoundError:
            return  # a new repo: push_to_hub creates it
        files = sorted(s.rfilename for s in (info.siblings or []))
        if CONFIG_FILE not in files:
            others = [f for f in files if f not in (".gitattributes", CARD_FILE)]
            if others:
                raise HubError(f"{repo} already exists and holds another kind of model ({', '.join(others[:4])}): "
                               "choose another --repo")
            return
        with open(hf_hub_download(repo, CONFIG_FILE, revision=info.sha, token=token), encoding="utf-8") as f:
            there = _config_identity(json.load(f))
    if there != identity:
        what = f"another model ({there}; this is {identity})" if there else "a model not shared by newllm_nb"
        raise HubError(f"{repo} already holds {what}: choose another --repo, or delete that repo first")


def share_on_hub(checkpoint: Union[str, Path, None], repo: str) -> Optional[str]:
    """The notebooks' "Share on the Hub" cell: with a token and a repo id, push; else say what is missing and
    do nothing. Returns the model's address, or None."""
    if not get_token():
        print(f"Not shared: no Hugging Face token. To share, {LOGIN_HELP}; set HUB_REPO = \"your-name/model-name\" "
              "in this cell and run it again.")
        return None
    if not repo:
        print('Not shared: set HUB_REPO = "your-name/model-name" in this cell and run it again.')
        return None
    if checkpoint is None:
        print("Not shared: there is nothing to share yet (no best checkpoint was written).")
        return None
    url = push(checkpoint, repo)
    print(f"Shared: {url}  (load it anywhere with load_model({repo!r}))")
    return url


# ---------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------
EQUATIONS = """\
h_t      = FNN([embed(x_t) ; c_{t-1}])          LAYERS × (Linear + ReLU + Dropout DROPOUT)
logits_t = W_out h_t
c_t      = clamp(LayerNorm(σ(W_f h_t) ⊙ c_{t-1} + σ(W_i h_t) ⊙ (W_u h_t)), −10, 10),   c_0 = 0"""

HUB_DATASETS = {"wikitext": ("Salesforce/wikitext", "WikiText-2"),
                "dolly": ("databricks/databricks-dolly-15k", "Dolly-15k")}


def best_record(history: list) -> Optional[dict]:
    """The epoch the shared weights come from: the last one marked best, else the lowest validation loss."""
    best = [r for r in history if r.get("best")]
    if best:
        return best[-1]
    scored = [r for r in history if isinstance(r.get("val_loss"), (int, float))]
    return min(scored, key=lambda r: r["val_loss"]) if scored else None


def data_source(ckpt: Checkpoint) -> tuple[str, bool, Optional[str]]:
    """(what the card says the data was, whether it is the bundled sample, the hub dataset id or None)."""
    cfg = ckpt.config.get("data", {})
    dataset = cfg.get("dataset", "wikitext")
    source = ckpt.meta.get("data_source")
    hub_id, title = HUB_DATASETS.get(dataset, (cfg.get("hub_name"), dataset))
    if source is None:
        return f"{title} (this checkpoint does not record where its text came from)", False, None
    s = str(source)
    if s.startswith(("bundled sample", "sample:")):
        return (f"**the bundled sample** ({s}), a few pages of text written for the package's tests, not "
                f"{title}: the figures below show the pipeline works, not what New-LLM reaches on {title}"), True, None
    if s.startswith("hub"):
        named = s.split()[1].split("@")[0] if s.startswith("hub ") and len(s.split()) > 1 else None
        return f"{title} from the Hugging Face Hub ({s})", False, named if named and "/" in named else hub_id
    return f"{title}, read from a local copy ({s})", False, None


def _architecture(m: ModelConfig, params: int) -> str:
    if m.arch == "lstm":
        head = f"An LSTM baseline ({m.lstm_layers} layer(s), hidden {m.lstm_hidden or m.hidden_dim}) sized to " \
               "match a New-LLM's parameter count, with New-LLM's interface."
        return f"{head}\n\nParameters: **{params:,}**"
    if m.arch == "transformer":
        head = f"A causal Transformer baseline ({m.tf_layers} layer(s), width {m.tf_dim}, {m.tf_heads} heads) " \
               "sized to match a New-LLM's parameter count."
        return f"{head}\n\nParameters: **{params:,}**"
    default = ModelConfig()
    shape = ("vocab_size", "embed_dim", "context_dim", "hidden_dim", "num_layers", "dropout", "arch")
    options = {k: v for k, v in vars(m).items() if k not in shape and v != getattr(default, k)}
    opts = ("Options on top of these equations (newllm_nb.config.ModelConfig documents each): "
            + ", ".join(f"`{k}={v!r}`" for k, v in options.items())) if options else \
        "The cell is exactly these equations (no cell option on)."
    equations = EQUATIONS.replace("LAYERS", str(m.num_layers)).replace("DROPOUT", str(m.dropout))
    return (f"New-LLM: attention-free, with no positional embeddings; all context lives in one vector c of "
            f"{m.context_dim} numbers, so the state is O(1) in sequence length. For each token t:\n\n"
            f"```\n{equations}\n```\n\n"
            f"vocab {m.vocab_size:,} · embed {m.embed_dim} · context {m.context_dim} · hidden {m.hidden_dim} · "
            f"{m.num_layers} FNN layer(s). {opts}\n\nParameters: **{params:,}**")


def _results(ckpt: Checkpoint, rc: RunConfig) -> tuple[str, Optional[dict]]:
    rec = best_record(ckpt.history)
    if rec is None:
        return "No validation was recorded with these weights.", None
    how = ("the mean over batches of each batch's mean (the original's way), UNK counted" if rc.train.original_metrics
           else "token-weighted over every non-PAD target, UNK counted, BOS never a target")
    tokens = rec.get("val_tokens")
    tok = f"{int(tokens):,}" if isinstance(tokens, (int, float)) else "not recorded"
    rows = [("validation loss", f"{rec['val_loss']:.4f}"), ("validation PPL", f"{rec['val_ppl']:.2f}"),
            ("validation accuracy", f"{100 * rec['val_acc']:.1f}%"), ("validation tokens", tok)]
    rows.append(("epoch", f"{rec['epoch']} of {len(ckpt.history)} recorded"))
    table = "| metric | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    return f"Validation split, best epoch; {how}.\n\n{table}", rec


def _recipe(rc: RunConfig) -> str:
    t, d = rc.train, rc.data
    lines = [f"optimizer {t.optimizer} (weight decay {t.weight_decay}), learning rate {t.effective_lr:.3g}"
             f"{'' if t.lr is not None else ' (1e-4·√(batch/32))'}, schedule {t.schedule}",
             f"batch {t.batch_size}, up to {t.epochs} epochs, early stopping after {t.patience} epochs without "
             f"improvement, gradient clip {t.clip}",
             f"precision {t.precision}, seed {t.seed}" + (f", EMA {t.ema_decay}" if t.ema_decay else ""),
             f"data: {d.dataset}, {d.tokenizer} tokenizer, windows of {d.max_seq_length} tokens ({d.mode} mode)"
             + (f", at most {d.max_examples} examples" if d.max_examples else "")]
    return "\n".join(f"- {x}" for x in lines) + "\n\nEvery setting is in `config.json`."


def model_card(shared: HubModel, repo_id: Optional[str] = None) -> ModelCard:
    """The card: hub metadata (library, tags, datasets, results) and what the model is, how it was trained,
    what it scored, and the command that trains it again."""
    name = repo_id or "OWNER/NAME"
    data = _card_metadata(shared, name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_card_body(shared, name)}")


def _card_metadata(shared: HubModel, name: str) -> ModelCardData:
    """The card's YAML header: library, tags, the hub dataset and its validation results (none on the sample)."""
    ckpt, rc = shared.checkpoint, shared.run_config
    _, is_sample, hub_dataset = data_source(ckpt)
    _, rec = _results(ckpt, rc)
    title = HUB_DATASETS.get(rc.data.dataset, (None, rc.data.dataset))[1]
    tags = sorted(set(TAGS + ["pytorch_model_hub_mixin", "model_hub_mixin"]
                      + (["bundled-sample"] if is_sample else [])))
    evals = None
    if rec is not None and hub_dataset and not is_sample:
        evals = [EvalResult(task_type="text-generation", dataset_type=hub_dataset, dataset_name=title,
                            dataset_split="validation", metric_type=kind, metric_name=label, metric_value=value)
                 for kind, label, value in (("perplexity", "validation PPL", round(rec["val_ppl"], 4)),
                                            ("accuracy", "validation accuracy", round(rec["val_acc"], 4)),
                                            ("loss", "validation loss", round(rec["val_loss"], 4)))]
    return ModelCardData(library_name="newllm-nb", pipeline_tag="text-generation", tags=tags,
                         datasets=[hub_dataset] if hub_dataset and not is_sample else None,
                         language=["en"] if rc.data.dataset in HUB_DATASETS else None,
                         model_name=name.split("/")[-1], eval_results=evals)


def _card_body(shared: HubModel, name: str) -> str:
    """The card's text: architecture, data, recipe and results, then how to use, reproduce and check it."""
    ckpt, rc = shared.checkpoint, shared.run_config
    source, is_sample, _ = data_source(ckpt)
    results, _ = _results(ckpt, rc)
    return f"""
# {name.split("/")[-1]}

A language model trained with [newllm-nb]({clone_url(REPOSITORY)}){' on the bundled sample' if is_sample else ''}.

## Architecture

{_architecture(rc.model, count_parameters(shared.model))}

## Data

{source}.

## Recipe

{_recipe(rc)}

## Results

{results}
""" + _use_sections(name, ckpt) + _files_section(shared)


def _use_sections(name: str, ckpt) -> str:
    """Loading the model from Python or the CLI, and the command that trains it again."""
    data_path = " --data-path YOUR_COPY" if str(ckpt.meta.get("data_source", "")).startswith("local") else ""
    return f"""
## Use

```python
from newllm_nb.train import load_model
from newllm_nb.infer import generate
model, tokenizer, _ = load_model("{name}")  # "{name}@REVISION" for a branch, tag or commit
print(generate(model, tokenizer, "the history of"))
```

or `python -m newllm_nb chat --checkpoint {name}`. Install: `pip install git+{clone_url(REPOSITORY)}`.

## Reproduce

```bash
hf download {name} config.json --local-dir {name.split("/")[-1]}
python -m newllm_nb train --config {name.split("/")[-1]}/config.json{data_path}
```
"""


def _files_section(shared: HubModel) -> str:
    """The repository's files, with the weights' SHA-256 and the run's fingerprint."""
    ckpt, rc = shared.checkpoint, shared.run_config
    fp = ckpt.fingerprint or {}
    record = (f"run fingerprint `{fingerprint_id(fp)}` (settings, a SHA-256 of the training and validation tokens "
              f"`{str(fp.get('data.train_sha256', ''))[:12]}` / `{str(fp.get('data.valid_sha256', ''))[:12]}`, and "
              f"the tokenizer `{str(fp.get('tokenizer.sha256', ''))[:12]}`)") if fp else "no run fingerprint recorded"
    return f"""
## Files

- `{WEIGHTS_FILE}`: the weights (safetensors, nothing to unpickle) with the run's config, tokenizer and history;
  SHA-256 `{shared.shared_sha256 or ckpt.sha256}` (checked on load, repeated in `config.json`)
- `{CONFIG_FILE}`: every setting of the run, and its {record}
- `{TOKENIZER_FILE}`: the {rc.data.tokenizer} tokenizer ({rc.model.vocab_size:,} ids), in the `tokenizers` format
"""
