"""Train New-LLM, or use a trained checkpoint: python -m newllm_nb train | sweep | generate | chat | push.

``train`` also runs under torchrun, one process per GPU (``torchrun --nproc_per_node=N -m newllm_nb
train ...``, same flags; ``--batch-size`` is then the global batch): see distributed.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Optional

import torch

from .config import (
    ARCHS,
    PRESETS,
    RENAMED_PRESETS,
    RunConfig,
    apply_overrides,
    is_smoke,
    preset,
    renamed,
    shrink_for_smoke,
)
from .data import prepare
from .data.sources import source_tag
from .experiments.experiment import keyed_run_dir, run_experiment
from .experiments.sweep import run_sweep
from .infer.generate import ChatSession, Sampling, stream
from .models.build import matched_config
from .runtime.distributed import init_from_env, launched, shutdown, world_size
from .runtime.files import shown_path
from .runtime.hardware import detect, recommend, resolve_device
from .runtime.stopping import Interrupted, terminate_as_interrupt
from .train.checkpoint import CheckpointError, load_model
from .train.hub import push
from .train.runs import check_writable
from .train.trainer import TrainingStopped

# What a user can cause or fix (bad values, files, folders, a full disk, CUDA out of memory, a run that
# cannot go on): one line naming it and exit code 2 (--debug: the traceback). Anything else is a bug: traceback.
USER_ERRORS = (ValueError, CheckpointError, TrainingStopped, torch.cuda.OutOfMemoryError, OSError)

# flag -> config field it sets (None: not given, so the preset's value stands)
FLAG_FIELDS = {"layers": "model__num_layers", "epochs": "train__epochs", "lr": "train__lr",
               "seq_len": "data__max_seq_length", "vocab_size": "model__vocab_size", "patience": "train__patience",
               "precision": "train__precision", "tokenizer": "data__tokenizer", "mode": "data__mode",
               "data_path": "data__path", "data_source": "data__source", "hub_revision": "data__hub_revision",
               "device": "train__device", "hub_dataset": "data__hub_name", "hub_config": "data__hub_config",
               "hub_split": "data__hub_split", "text_field": "data__text_field",
               "tokenizer_sample_mb": "data__tokenizer_sample_mb", "cache_dir": "data__cache_dir",
               "checkpoint_every": "train__checkpoint_every_minutes"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m newllm_nb", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train New-LLM (or a baseline) and print validation loss / PPL / accuracy")
    t.add_argument("--layers", type=int, help="FNN layers")
    t.add_argument("--arch", choices=ARCHS, help="baselines are sized to match")
    w = sub.add_parser("sweep", help="train one run per layer count (and architecture), several at once with --jobs")
    w.add_argument("--layers", required=True, help="comma-separated layer counts, e.g. 1,4,5,6,7")
    w.add_argument("--archs", default="newllm", help=f"comma-separated: {', '.join(ARCHS)}")
    w.add_argument("--out-dir", default="runs/sweep", help="one run folder per run; finished runs are skipped")
    w.add_argument("--jobs", type=int, default=1, help="runs at a time, spread over the visible GPUs (one each)")
    for q in (t, w):
        _add_recipe_flags(q)
        _add_data_flags(q)
        _add_run_flags(q)
    t.add_argument("--run-dir", help="checkpoints go here; an unfinished run there is resumed (default runs/NAME)")
    t.add_argument("--no-resume", action="store_true", help="start this configuration's run over (its checkpoints "
                                                              "are discarded)")
    t.add_argument("--overwrite", action="store_true", help="also replace another configuration's run in --run-dir "
                                                            "(refused without it)")
    for q in (t, w, *_checkpoint_parsers(sub)):
        q.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _add_recipe_flags(q: argparse.ArgumentParser) -> None:
    """train and sweep: where the config starts (dataset, preset or config file) and its main fields."""
    q.add_argument("--dataset", choices=["wikitext", "dolly", "text"],
                   help="default: wikitext (or --config's); text: any corpus, --data-path files / folder / glob "
                        "or --hub-dataset (docs/corpus.md)")
    q.add_argument("--preset", choices=sorted(PRESETS), help="default: original_wikitext or original_dolly")
    q.add_argument("--config", help="a config.json (a shared model's, or RunConfig.to_dict() as JSON) instead of "
                                    "a preset; the other flags still apply")
    q.add_argument("--epochs", type=int)
    q.add_argument("--batch-size", type=int, help="default: this machine's recommendation (under torchrun: "
                                                  "the global batch, shared by the processes)")
    q.add_argument("--lr", type=float, help="default: 1e-4 * sqrt(batch / 32), from the global batch")
    q.add_argument("--seq-len", type=int, help="max_seq_length")
    q.add_argument("--vocab-size", type=int)
    q.add_argument("--patience", type=int)
    q.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    q.add_argument("--tokenizer", choices=["word", "bpe"])
    q.add_argument("--mode", choices=["windows", "stream", "packed"])


def _add_data_flags(q: argparse.ArgumentParser) -> None:
    """train and sweep: where the text comes from (local files, the hub, the bundled sample)."""
    q.add_argument("--data-path", help="local WikiText file/folder or Dolly jsonl (default: the hub)")
    q.add_argument("--data-source", choices=["auto", "hub", "sample"],
                   help="without --data-path: auto (default) = the hub, or the bundled sample only when the hub "
                        "cannot be asked (offline, unreachable); hub = the hub or an error; sample = the "
                        "bundled sample")
    q.add_argument("--hub-revision", help="a branch, tag or commit of the dataset's hub repository")
    q.add_argument("--hub-dataset", help="--dataset text: a hub dataset id, e.g. Salesforce/wikitext")
    q.add_argument("--hub-config", help="--dataset text: its config, e.g. wikitext-103-raw-v1")
    q.add_argument("--hub-split", help="--dataset text: the split to train on (default train)")
    q.add_argument("--text-field", help="--dataset text: the field / column holding the text (default text)")
    q.add_argument("--tokenizer-sample-mb", type=float,
                   help="--dataset text: train the tokenizer on the first N MB")
    q.add_argument("--cache-dir", help="--dataset text: token cache folder (default $NEWLLM_CACHE_DIR or "
                                       "~/.cache/newllm_nb)")


def _add_run_flags(q: argparse.ArgumentParser) -> None:
    """train and sweep: how the run goes (device, metrics, smoke, progress, mid-epoch saves)."""
    q.add_argument("--device", help="auto | cpu | cuda | cuda:N (under torchrun: cpu or cuda, one GPU per rank)")
    q.add_argument("--original-metrics", action="store_true", help="average metrics per batch, as the original did")
    q.add_argument("--smoke", action="store_true", help="tiny data and at most 2 epochs (also NEWLLM_SMOKE=1)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--checkpoint-every", type=float, metavar="MINUTES",
                   help="also save `last` every MINUTES within an epoch (default 10); Ctrl-C and SIGTERM save too")


def _checkpoint_parsers(sub) -> tuple[argparse.ArgumentParser, ...]:
    """generate, chat and push: the commands that use a trained checkpoint."""
    where = "a .safetensors checkpoint, a run folder, a shared model's folder, or a hub id OWNER/NAME[@REVISION]"
    g = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    g.add_argument("--checkpoint", required=True, help=where)
    g.add_argument("--prompt", required=True)
    c = sub.add_parser("chat", help="chat in the terminal with a trained checkpoint (EOF or Ctrl-C ends)")
    c.add_argument("--checkpoint", required=True, help=where)
    s = sub.add_parser("push", help="share a checkpoint on the Hugging Face Hub, with its tokenizer and model card")
    s.add_argument("--checkpoint", required=True, help=where)
    s.add_argument("--repo", required=True, help="OWNER/NAME of the model repo on the hub")
    s.add_argument("--local-dir", help="write the folder that would be uploaded there, and upload nothing")
    s.add_argument("--private", action="store_true", help="create the repo as private")
    for q in (g, c, s):
        q.add_argument("--revision", help="with a hub id: a branch, tag or commit (default main)")
    for q in (g, c):
        q.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
        q.add_argument("--top-k", type=int, default=0, help="0 = off")
        q.add_argument("--top-p", type=float, default=1.0, help="1 = off")
        q.add_argument("--max-tokens", type=int, default=60)
        q.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
        q.add_argument("--seed", type=int, help="fixed sampling seed")
        q.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    return g, c, s


def config_from_args(args: argparse.Namespace, recommended_batch: int) -> RunConfig:
    """The RunConfig the flags describe: the preset, then every given flag, then baseline sizing and smoke mode."""
    if args.config and args.preset:
        raise ValueError("--config and --preset both given: a run starts from one of them")
    dataset = args.dataset or ("wikitext" if not args.config else None)  # --config: its own dataset
    name = args.preset or f"original_{'wikitext' if dataset == 'text' else dataset}"
    ov = {"data__dataset": dataset} if dataset else {}
    # The original's presets tie batch to the GPU (its table); other presets keep the batch they were measured with.
    if args.batch_size is not None:
        ov["train__batch_size"] = args.batch_size
    elif name.startswith("original_") and not args.config:
        ov["train__batch_size"] = recommended_batch
    for flag, key in FLAG_FIELDS.items():
        if getattr(args, flag, None) is not None:
            ov[key] = getattr(args, flag)
    if args.original_metrics:
        ov["train__original_metrics"] = True
    if args.quiet:
        ov["train__show_progress"] = False
    cfg = apply_overrides(_config_file(args.config) if args.config else preset(name), **ov)
    if getattr(args, "arch", None) and args.arch != "newllm":
        cfg = apply_overrides(cfg, **{f"model__{k}": v for k, v in vars(matched_config(cfg.model, args.arch)).items()})
    return shrink_for_smoke(cfg) if args.smoke or is_smoke() else cfg


def _config_file(path: str) -> RunConfig:
    """The run config a JSON file holds: its model / data / train sections (other keys, e.g. a shared model's
    fingerprint, are ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
            raise ValueError("it has no 'model' section")
        return RunConfig.from_dict({k: d[k] for k in ("model", "data", "train") if k in d})
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"--config {path}: not a run config ({e})") from None


RENAMED_FLAGS = {"--seed-compatible": "--original-metrics"}


def _current_names(argv: Sequence[str]) -> list[str]:
    """``argv`` with former flag and preset names replaced by today's (config.renamed says so in one line)."""
    out = []
    for a in argv:
        flag, eq, value = a.partition("=")
        if flag in RENAMED_FLAGS:
            a = renamed(flag, RENAMED_FLAGS[flag]) + eq + value
        elif (flag == "--preset" and value in RENAMED_PRESETS) or (out and out[-1] == "--preset"
                                                                    and a in RENAMED_PRESETS):
            old = value if eq else a
            a = (flag + eq if eq else "") + renamed(old, RENAMED_PRESETS[old])
        out.append(a)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(_current_names(sys.argv[1:] if argv is None else argv))
    command = {"train": _train, "sweep": _sweep, "generate": _generate, "chat": _chat, "push": _push}[args.command]
    distributed = args.command == "train" and launched()
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        if distributed:
            args.device = init_from_env(args.device)
        # Under torchrun only rank 0 prints; the others' errors still reach stderr.
        with contextlib.redirect_stdout(open(os.devnull, "w")) if not main_rank else contextlib.nullcontext(), \
                terminate_as_interrupt():
            code = command(args)
        if distributed:
            shutdown()
        return code
    except Interrupted as e:  # training stopped by a signal, its work saved
        if main_rank:
            print(e.message("run the same command again to resume"), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # a signal outside the training loop: nothing of a run to save
        signum = getattr(e, "signum", signal.SIGINT)
        training = " before training started: nothing to save" if args.command in ("train", "sweep") else ""
        print(f"\nstopped by {signal.Signals(signum).name}{training}", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # the reader of our output went away (`| head`): stop writing to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        print("error: the output was closed before the command finished (e.g. by `| head`)", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if args.debug:
            raise
        if main_rank or not getattr(e, "agreed", False):  # an error all ranks agreed on is printed once
            where = "" if main_rank or not distributed else f" (rank {os.environ.get('RANK')})"
            print(f"error{where}: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(e: BaseException) -> str:
    """The error as one line; an OS error says what failed and on which file (a very long name is shortened)."""
    if isinstance(e, OSError) and e.strerror:
        names = [shown_path(n) for n in (e.filename, e.filename2) if n is not None]
        return f"{e.strerror}" + (f": {' -> '.join(names)}" if names else "")
    return " ".join(str(e).splitlines()) or type(e).__name__


def _train(args: argparse.Namespace) -> int:
    if args.device not in (None, "auto"):
        resolve_device(args.device)  # a device that is not there: one line, before the data is read
    if args.run_dir:
        check_writable(args.run_dir)  # before the data is read and anything trains
    info = detect(args.device if args.device not in (None, "auto") else None)
    cfg = config_from_args(args, recommend(info).batch_size)
    prepared = prepare(cfg.data, cfg.model.vocab_size)
    print(prepared.summary())
    name = f"{source_tag(cfg.data.dataset, prepared.source)}-{cfg.model.arch}-L{cfg.model.num_layers}"
    run_dir = args.run_dir or keyed_run_dir("runs", name, cfg, prepared)
    world = world_size()
    batch = (f"global batch {cfg.train.batch_size} ({world} processes, about {-(-cfg.train.batch_size // world)} "
             f"each)" if world > 1 else f"batch {cfg.train.batch_size}")
    rule = "" if world == 1 else " (given)" if cfg.train.lr is not None else " (1e-4*sqrt(global batch/32))"
    print(f"device: {info.name} ({info.kind}){f' x {world}' if world > 1 else ''} | {batch} | "
          f"lr {cfg.train.effective_lr:.2e}{rule} | layers {cfg.model.num_layers} | run dir {run_dir}")
    res = run_experiment(cfg, run_dir, resume=not args.no_resume, prepared=prepared, overwrite=args.overwrite)
    print(f"\n{res.summary()}")
    print(f"checkpoint: {res.best_path}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    if args.device not in (None, "auto"):
        resolve_device(args.device)
    info = detect(args.device if args.device not in (None, "auto") else None)
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "layers": None}), recommend(info).batch_size)
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {args.layers!r}: give comma-separated whole numbers, e.g. 1,4,5,6,7") from None
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not layers or args.jobs < 1:
        raise ValueError(f"sweep needs layer counts, --jobs >= 1 and archs among {', '.join(ARCHS)} "
                         f"(got --layers {args.layers}, --archs {args.archs}, --jobs {args.jobs})")
    try:
        df = run_sweep(cfg, layers, args.out_dir, archs=archs, jobs=args.jobs)
    except Interrupted as e:  # the runs finished so far, then the stop line
        if e.result is not None:
            print(e.result.to_string(index=False))
        raise
    print(df.to_string(index=False))
    return 1 if "error" in df.columns and df["error"].notna().any() else 0


def _sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)


def _generate(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    model, tokenizer, _ = load_model(args.checkpoint, args.device, args.revision)
    for piece in stream(model, tokenizer, args.prompt, sampling, stop=()):
        print(piece, end="", flush=True)
    print()
    return 0


def _chat(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    model, tokenizer, ckpt = load_model(args.checkpoint, args.device, args.revision)
    session = ChatSession(model, tokenizer, sampling)
    print(f"chatting with {args.checkpoint} (one context vector for the whole talk); EOF (Ctrl-D) or Ctrl-C ends")
    while True:
        try:
            message = input("you: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not message.strip():  # nothing to say yet: ask again
            continue
        print("model:", end="", flush=True)
        for piece in session.stream(message):
            print(piece, end="", flush=True)
        print()


def _push(args: argparse.Namespace) -> int:
    where = push(args.checkpoint, args.repo, args.local_dir, revision=args.revision, private=args.private or None)
    print(f"wrote {where} (README.md, config.json, model.safetensors, tokenizer.json); nothing uploaded"
          if args.local_dir else f"shared: {where}")
    return 0
