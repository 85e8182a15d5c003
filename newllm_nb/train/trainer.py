"""Training: ``Trainer`` sets up a run (device, precision, optimizer, step, state) and ``fit`` is the loop.

The loop reads top to bottom: set the learning rate, take a step, count it, checkpoint now and then;
at each epoch's end evaluate, record, checkpoint, and stop when the epochs run out or validation
stops improving. What a step does lives in step.py, what a resume needs in state.py, and what the
metrics count in metrics.py.

``run_dir`` (optional) receives ``best.safetensors`` and ``last.safetensors`` (the one before it kept as
``last.prev.safetensors``, plus ``epoch_K.safetensors`` every ``keep_every`` epochs). A ``last`` there is
resumed automatically if it was written by the same configuration (runs.py's fingerprint); another
configuration's run is refused, naming what differs. A lock keeps a second process out of the folder.

Under torchrun (distributed.py) every rank runs this loop on its share of each global batch; rank 0
alone holds the lock, decides whether and from what to resume (the others load the checkpoint it
names, or raise the error it raised), shows progress, prints and writes checkpoints. Everything the
loop decides on (losses, validation, when to save) is the same on every rank, so all ranks stop together.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional, Protocol, Union

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, original_lr
from ..data.batching import Dataset
from ..kernels import workspace
from ..runtime.distributed import (
    agreed,
    barrier,
    broadcast_parameters,
    check_same,
    gather_objects,
    gather_state,
    max_over_ranks,
    rank,
    shard_state,
    world_size,
)
from ..runtime.hardware import resolve_device, resolve_precision
from ..runtime.stopping import Interrupted, StopSignals
from .checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    DamagedCheckpointError,
    load_checkpoint,
    peek_checkpoint,
    save_checkpoint,
)
from .metrics import Metrics, eval_batch_size, evaluate
from .optim import WeightAverage, lr_at, make_optimizer
from .runs import RunFolderError, RunLock, check_writable, differences, run_fingerprint
from .state import TrainState
from .step import make_step


class TrainingStopped(RuntimeError):
    """Training cannot go on (the message says why and which checkpoint is kept)."""


class NonFiniteLossError(TrainingStopped):
    """The loss diverged: too many consecutive non-finite losses, or a non-finite validation loss."""


class DivergedError(TrainingStopped):
    """Validation loss finite but absurd: worse than a uniform guess, or far above its own best."""


# When a run counts as diverged. A fresh model (weights N(0, 0.02)) predicts almost uniformly, so its loss
# starts at about log V, the loss of a uniform guess over the V tokens; anything it learns takes it below.
# A slow but healthy start (a small learning rate) stays near log V, so the bar is one nat above it
# (perplexity e times a uniform guess's), and it must stay there for two epochs: one bad epoch can be a
# spike the run recovers from. Separately, a validation loss more than log 10 above the run's best (ten
# times its best perplexity) is a blow-up: overfitting, which early stopping handles, moves it by tenths.
UNIFORM_MARGIN = 1.0
UNIFORM_EPOCHS = 2
BLOW_UP = math.log(10)


class OutOfMemory(TrainingStopped):
    """CUDA ran out of memory at this batch size."""


class TrainHook(Protocol):
    """Something the loop calls around updates, e.g. ``expansion.BaseFreeze`` keeping a grown model's base."""

    def after_update(self) -> None: ...
    def after_resume(self) -> None: ...


class Trainer:
    """Train ``model`` on ``train``, validating on ``valid``, as ``config.train`` says.

    ``progress`` (default ``tqdm.auto.tqdm``) draws the epochs bar and each epoch's transient bar.
    ``callbacks`` get each epoch's history record (live plots); ``step_callbacks`` get
    ``{"step", "epoch", "loss"}`` after every training step; ``hooks`` run after each update and resume.
    Hooks that change which parameters train (``BaseFreeze``) must be made before the Trainer.
    """

    def __init__(self, model: torch.nn.Module, train: Optional[Dataset], valid: Optional[Dataset],
                 config: RunConfig, tokenizer=None, run_dir: Optional[Union[str, Path]] = None,
                 callbacks: Sequence[Callable[[dict], None]] = (),
                 step_callbacks: Sequence[Callable[[dict], None]] = (), hooks: Sequence[TrainHook] = (),
                 progress: Optional[Callable] = None, data_source: str = "") -> None:
        self.cfg = config
        self.data_source = data_source  # where the text came from (sources.py's source string), kept in checkpoints
        self.progress = progress or tqdm  # a tqdm-like class for the bars (notebooks label theirs per run)
        tc = config.train
        if tc.freeze_base and not hooks:
            raise ValueError("train.freeze_base=True needs the BaseFreeze hook: grow and train a model with "
                             "expansion.growth_experiment, or pass hooks=[expansion.BaseFreeze(model)]")
        self.device = resolve_device(tc.device)
        self.precision = resolve_precision(tc.precision, self.device)
        self.model = model.to(self.device)
        self.rank, self.world = rank(), world_size()
        self.main = self.rank == 0
        if self.world > 1:  # every rank must cut the same global batches from the same data
            check_same([d.content_hash() for d in (train, valid) if d is not None], "training / validation data")
        broadcast_parameters(self.model)  # ranks > 0 start from rank 0's weights (a no-op for one process)
        self.train_data, self.valid_data = train, valid
        self.tokenizer = tokenizer
        self.run_dir = check_writable(run_dir) if run_dir else None
        self.fingerprint = run_fingerprint(config, train, valid, tokenizer) if self.run_dir else None
        self.callbacks, self.step_callbacks, self.hooks = list(callbacks), list(step_callbacks), list(hooks)
        self.optimizer = make_optimizer(self.model, tc, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.state = TrainState(metrics=Metrics(tc.original_metrics),
                                ema=WeightAverage(self.model, tc.ema_decay) if tc.ema_decay > 0 else None)
        self.rank_rng: dict = {}  # ranks > 0's RNG streams, for rank 0's next full checkpoint
        self.step = make_step(tc.fast_path, self.model, self.optimizer, self.scaler, self.device, self.precision)
        self.stop = StopSignals()  # the loop's own, entered while it runs
        self.last_written: Optional[str] = None  # where the run stood when `last` was last written

    @property
    def history(self) -> list[dict]:
        return self.state.history

    @property
    def ema(self) -> Optional[WeightAverage]:
        return self.state.ema

    @property
    def last_path(self) -> Optional[Path]:
        return self.run_dir / "last.safetensors" if self.run_dir else None

    @property
    def best_path(self) -> Optional[Path]:
        return self.run_dir / "best.safetensors" if self.run_dir else None

    @property
    def previous_path(self) -> Optional[Path]:
        return self.run_dir / "last.prev.safetensors" if self.run_dir else None

    # -- checkpoints ----------------------------------------------------------------------------------
    def save(self, path: Union[str, Path], full: bool = True) -> Path:
        """A checkpoint of the model; ``full`` adds everything a resume needs (optimizer, scaler, state). A new
        ``last`` moves the one before it to ``last.prev`` once it is complete; a failed write changes no file."""
        meta, tensors = self.state.to_checkpoint()
        path = Path(path)
        is_last = path == self.last_path

        def keep_previous() -> None:  # one good `last` to fall back on
            if path.exists():
                path.replace(self.previous_path)

        try:
            save_checkpoint(path, self.model, config=self.cfg.to_dict(), tokenizer=self.tokenizer,
                            history=self.state.history, optimizer=self.optimizer if full else None,
                            scaler=self.scaler if full else None, trainer_state=meta,
                            extra_tensors={**tensors, **self.rank_rng} if full else {},
                            fingerprint=self.fingerprint, data_source=self.data_source,
                            before_replace=keep_previous if is_last else None)
        except CheckpointWriteError as e:
            raise CheckpointWriteError(f"{e}: {self._intact()}") from e
        if is_last:
            self.last_written = self._position()
        return path

    def _position(self) -> str:
        st = self.state
        return f"epoch {st.epoch + 1}, step {st.step_in_epoch}" if st.step_in_epoch else f"end of epoch {st.epoch}"

    def _intact(self) -> str:
        """Which checkpoints a failed write left, for its one-line message."""
        kept = []
        if self.last_path is not None and self.last_path.exists():
            kept.append(f"{self.last_path} ({self.last_written or 'from before'}) is intact and resumable")
        elif self.previous_path is not None and self.previous_path.exists():
            kept.append(f"{self.previous_path} is intact and resumable")
        if self.best_path is not None and self.best_path.exists():
            kept.append(f"{self.best_path.name} is intact")
        return ("; ".join(kept) if kept else "no checkpoint of this run is on disk yet") + \
            ": free space (or choose another --run-dir) and run again"

    def _resumable(self):
        """The newest good full checkpoint of this run folder, or None for a fresh one. A damaged ``last``
        falls back to ``last.prev`` (saying so). With neither, a ``best`` that ended the run stands for it."""
        found = [p for p in (self.last_path, self.previous_path) if p.exists()]
        for i, path in enumerate(found):
            try:
                return load_checkpoint(path)
            except DamagedCheckpointError as e:
                if i + 1 == len(found):
                    raise
                print(f"{e}; resuming from the previous checkpoint {found[i + 1]}")
        if self.best_path.exists():
            best = load_checkpoint(self.best_path)
            if not best.trainer_state.get("finished"):
                raise RunFolderError(
                    f"run folder {self.run_dir} holds this configuration's {self.best_path.name} (epoch "
                    f"{len(best.history)}) but no last checkpoint to resume from: use it as it is (generate "
                    f"--checkpoint {self.best_path}), or train again from scratch with --overwrite (overwrite=True)")
            return best
        return None

    def _check_folder(self, resume: bool, overwrite: bool) -> None:
        """Every checkpoint in the folder must be this configuration's, unless ``overwrite``; starting over
        (``resume=False`` or ``overwrite``) discards them, saying what."""
        found = {p: peek_checkpoint(p) for p in sorted(self.run_dir.glob("*.safetensors"))}
        found = {p: meta for p, meta in found.items() if meta is not None}  # a damaged one: _resumable decides
        foreign = {p: meta.get("fingerprint") for p, meta in found.items()
                   if meta.get("fingerprint") != self.fingerprint}
        if foreign and not overwrite:
            path, stored = next(iter(foreign.items()))
            why = differences(stored, self.fingerprint) if stored else "it records no configuration"
            raise RunFolderError(f"run folder {self.run_dir} holds another configuration's run ({why}) in {path.name}: "
                                 f"choose another run folder, the same settings to resume it, or --overwrite "
                                 f"(overwrite=True) to replace it")
        if found and (overwrite or not resume):
            last = found.get(self.last_path, {}).get("trainer_state", {})
            at = f", last saved at epoch {last.get('epoch', 0) + 1} step {last.get('step_in_epoch', 0)}" if last else ""
            whose = "another configuration's run" if foreign else "this configuration's earlier run"
            self._print(f"starting over in {self.run_dir}: discarding {whose} ({', '.join(p.name for p in found)}{at})")
            for p in found:
                p.unlink()

    def resume(self, path) -> None:
        """Continue a run from a full checkpoint (a path, or a loaded one): weights, optimizer, scaler, state, RNG."""
        ckpt = path if not isinstance(path, (str, Path)) else load_checkpoint(path)
        if ckpt.config.get("model") != self.cfg.to_dict()["model"]:
            raise CheckpointError(f"{ckpt.path} was written for another model config "
                                  f"({ckpt.config.get('model')}); use a new run name or the same settings")
        ckpt.load_into(self.model)
        opt = ckpt.optimizer_state()
        if opt is None:
            raise CheckpointError(f"{ckpt.path} has no optimizer state: it is a 'best' checkpoint, not resumable")
        self.optimizer.load_state_dict(opt)
        if "scaler" in ckpt.meta and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt.meta["scaler"])
        self.state.restore(ckpt, self.device)
        for hook in self.hooks:
            hook.after_resume()

    def _averaged(self):
        """Validation and ``best`` use the averaged weights when the recipe keeps an average."""
        return self.state.ema.applied() if self.state.ema is not None else contextlib.nullcontext()

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, resume: bool = True, overwrite: bool = False) -> list[dict]:
        """Train until ``epochs`` run out or validation stops improving; returns the history. ``resume=False``
        starts this configuration's run over; ``overwrite`` also replaces another configuration's run."""
        with contextlib.ExitStack() as held:  # holds the run folder's lock (rank 0) until training ends
            held.callback(workspace.release)  # the CPU step's kept buffers: not needed once training ends
            ckpt = agreed(lambda: self._claim(held, resume, overwrite),
                          share=lambda c: None if c is None else str(c.path),
                          receive=lambda path: None if path is None else load_checkpoint(path))
            history = self._fit(ckpt)
            barrier()  # no rank reads best / last before rank 0 has written them
            return history

    def _claim(self, held: contextlib.ExitStack, resume: bool, overwrite: bool):
        """Lock the run folder, clear a killed write's leftovers, check whose run it holds and find the
        checkpoint to resume (rank 0)."""
        if self.run_dir is None:
            return None
        held.enter_context(RunLock(self.run_dir))
        for stale in self.run_dir.glob(".*.tmp"):  # left by a kill mid-write; never a checkpoint
            stale.unlink()
        self._check_folder(resume, overwrite)
        return self._resumable() if resume and not overwrite else None

    def _print(self, *args) -> None:
        if self.main:
            print(*args)

    def _checkpoint(self, path: Path, full: bool = True) -> None:
        """``save`` from rank 0, with the carried context of every rank's streams (a collective: all ranks call)."""
        st = self.state
        context = gather_state(st.context) if full and self.world > 1 else st.context
        if full and self.world > 1:  # each rank draws its own dropout masks: keep every rank's streams
            mine = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
                    else None)
            self.rank_rng = {f"rng.rank{r}.{kind}": t for r, states in enumerate(gather_objects(mine)) if r
                             for kind, t in zip(("cpu", "cuda"), states) if t is not None}
        if self.main:
            own, st.context = st.context, context
            try:
                self.save(path, full)
            finally:
                st.context = own

    def _restore_rank_rng(self, ckpt) -> None:
        """A rank > 0 takes back its own RNG streams (``resume`` gave it rank 0's)."""
        cpu, gpu = (ckpt.extra(f"rng.rank{self.rank}.{kind}") for kind in ("cpu", "cuda"))
        if cpu is None:  # written by fewer processes: a stream of this rank's own, fixed by the step reached
            torch.manual_seed(self.cfg.train.seed + self.rank + 7919 * self.state.global_step)
            return
        torch.set_rng_state(cpu)
        if gpu is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(gpu, self.device)

    def _fit(self, ckpt) -> list[dict]:
        """The loop: start (or resume), then train and validate epoch by epoch until the epochs run out or
        validation stops improving. A stop signal ends it after the current step, saved (stopping.py)."""
        tc, st = self.cfg.train, self.state
        if not self._start(ckpt):
            return st.history
        bar = self.progress(total=tc.epochs, initial=st.epoch, desc="epochs", disable=not self.show)
        try:
            with StopSignals() as self.stop:
                while st.epoch < tc.epochs and not st.finished:
                    self._train_epoch()
                    rec = self._end_epoch()
                    bar.update(1)
                    bar.set_postfix(train=f"{rec['train_loss']:.3f}", val_ppl=f"{rec['val_ppl']:.2f}")
                    if not st.finished:
                        self._stop_if_asked(save=False)
        except torch.cuda.OutOfMemoryError as e:
            B = tc.batch_size
            raise OutOfMemory(
                f"CUDA out of memory at batch_size={B}: try batch_size={max(1, B // 2)} (and lr by the original rule). "
                f"Last checkpoint kept: {self._last_good()}") from e
        except KeyboardInterrupt as e:  # a second Ctrl-C, mid-step: the state is half updated, nothing is saved
            if isinstance(e, Interrupted):
                raise
            raise self._interrupted(self.stop.signum or signal.SIGINT, saved=False) from None
        finally:
            bar.close()
        if not st.finished:  # resumed with no epochs left to run
            st.finished = True
            if self.run_dir:
                self._checkpoint(self.last_path)
        return st.history

    def _start(self, ckpt) -> bool:
        """Resume ``ckpt`` (or seed a fresh run) and say so; False when the run finished earlier."""
        tc, st = self.cfg.train, self.state
        if ckpt is not None and ckpt.optimizer_state() is None:  # a finished run of which only `best` is left
            ckpt.load_into(self.model)
            st.history, st.finished = list(ckpt.history), True
            self._print(f"run in {self.run_dir} finished earlier ({len(st.history)} epochs; its last checkpoint is "
                        f"gone, {ckpt.path.name} is kept): not trained again")
            return False
        if ckpt is not None:
            self.resume(ckpt)
            st.context = shard_state(st.context, self.rank, self.world)  # saved whole; each rank takes its streams
            if self.rank > 0:
                self._restore_rank_rng(ckpt)
            if st.finished:
                self._print(f"run in {self.run_dir} finished earlier ({len(st.history)} epochs): not trained again")
                return False
            self._print(f"resumed {ckpt.path} at epoch {st.epoch + 1}, step {st.step_in_epoch}")
            self.last_written = self._position()
        else:
            # Rank r seeds with seed + r: ranks draw different dropout masks (the same masks on every rank would
            # correlate the noise of a global batch's shards); rank 0, and so one process, is unchanged.
            torch.manual_seed(tc.seed + self.rank)
        B = tc.batch_size
        if self.world > 1:
            rule = "given" if tc.lr is not None else f"original rule 1e-4*sqrt({B}/32) = {original_lr(B):.2e}"
            self._print(f"data parallel: {self.world} processes | global batch {B} (about {-(-B // self.world)} "
                        f"per process) | lr {tc.effective_lr:.2e} ({rule}, from the global batch)")
        self.show = tc.show_progress and self.main
        self.steps_per_epoch = self.train_data.num_batches(B)
        self.total_steps = self.steps_per_epoch * tc.epochs
        self.last_save = time.monotonic()
        self.consecutive_bad = 0
        self.lr = lr_at(tc, st.global_step, self.total_steps)
        return True

    def _train_epoch(self) -> None:
        """The epoch's steps from where it stands (a resume skips the batches already trained on), saving
        ``last`` every ``checkpoint_every_minutes`` and at a stop signal."""
        tc, st = self.cfg.train, self.state
        clip = tc.clip_for_epoch(st.epoch)
        self.model.train()
        t0 = time.perf_counter()
        inner = self.progress(total=self.steps_per_epoch, initial=st.step_in_epoch, leave=False,
                              desc=f"epoch {st.epoch + 1}", disable=not self.show)
        batches = self.train_data.batches(tc.batch_size, shuffle=True, seed=tc.seed + st.epoch, rank=self.rank,
                                          world=self.world)
        try:
            for i, batch in enumerate(batches):
                if i < st.step_in_epoch:
                    continue
                out = self._train_step(batch, clip)
                st.step_in_epoch = i + 1
                inner.update(1)
                self._report_step(out)
                st.epoch_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                self._stop_if_asked(save=True)
        finally:
            inner.close()
        st.epoch_seconds += time.perf_counter() - t0

    def _train_step(self, batch, clip: float):
        """Set the learning rate, take one step and count it; a non-finite loss skips the update (too many in a
        row stop the run)."""
        tc, st = self.cfg.train, self.state
        self.lr = lr_at(tc, st.global_step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        out = self.step(batch, st.context, clip)
        st.context = out.context
        if out.finite:
            for hook in self.hooks:
                hook.after_update()
            if st.ema is not None:
                st.ema.update()
            st.metrics.add(out.loss_sum, out.n, out.correct)
            self.consecutive_bad = 0
        else:
            self.consecutive_bad += 1
            st.nonfinite_epoch += 1
            if self.consecutive_bad >= tc.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self.consecutive_bad} consecutive non-finite losses at epoch {st.epoch + 1}, "
                    f"step {st.step_in_epoch + 1} (lr={self.lr:.3g}, precision={self.precision}): the learning rate "
                    f"is probably too high (try lr/10 or a smaller clip) or fp16 overflowed (use bf16/fp32). "
                    f"Last good checkpoint: {self._last_good()}")
        st.global_step += 1
        return out

    def _report_step(self, out) -> None:
        if self.step_callbacks:
            st = self.state
            rec = {"step": st.global_step, "epoch": st.epoch + 1, "loss": float(out.loss_sum) / max(1.0, float(out.n))}
            for cb in self.step_callbacks:
                cb(rec)

    def _stop_if_asked(self, save: bool) -> None:
        """Between steps: write ``last`` when the checkpoint interval has passed (``save``) or a stop signal came,
        and raise ``Interrupted`` for the signal. Every rank decides alike: rank 0's clock decides the saving
        and a signal that reached any rank stops them all (saving gathers every rank's streams)."""
        interval = 60 * self.cfg.train.checkpoint_every_minutes
        due = save and self.run_dir is not None and time.monotonic() - self.last_save > interval
        due, signum = max_over_ranks(due and self.main, self.stop.signum or 0)
        if (due or (signum and save)) and self.run_dir is not None:
            self._checkpoint(self.last_path)
            self.last_save = time.monotonic()
        if signum:
            raise self._interrupted(signum, saved=True)

    def _interrupted(self, signum: int, saved: bool) -> Interrupted:
        st = self.state
        where = (f"at epoch {st.epoch + 1}, step {st.step_in_epoch}" if st.step_in_epoch
                 else f"after epoch {st.epoch}")
        kept = self.last_path if self.last_path is not None and self.last_path.exists() else None
        return Interrupted(signum, where, kept, saved=saved and kept is not None)

    def _end_epoch(self) -> dict:
        """Validate, record the epoch, write ``best`` / ``last``, decide whether to stop early; the record."""
        tc, st = self.cfg.train, self.state
        train = st.metrics.result()
        with self._averaged():
            val = evaluate(self.model, self.valid_data, eval_batch_size(tc.batch_size), self.device, self.precision,
                           tc.original_metrics)
        if not (math.isfinite(val["loss"]) and math.isfinite(train["loss"])):
            raise NonFiniteLossError(
                f"the run diverged: {'validation' if math.isfinite(train['loss']) else 'training'} loss is "
                f"not finite at epoch {st.epoch + 1} (lr={self.lr:.3g}, precision={self.precision}); try lr/10, "
                f"a smaller clip or bf16/fp32. Last good checkpoint: {self._last_good()}")
        self._check_diverged(val["loss"])
        improved = val["loss"] < st.best_val - tc.min_delta
        st.best_val = val["loss"] if improved else st.best_val
        st.bad_epochs = 0 if improved else st.bad_epochs + 1
        seconds = st.epoch_seconds
        rec = {"epoch": st.epoch + 1, "train_loss": train["loss"], "train_ppl": train["ppl"],
               "val_loss": val["loss"], "val_ppl": val["ppl"], "val_acc": val["acc"], "val_tokens": val["tokens"],
               "tokens_per_s": train["tokens"] / seconds if seconds > 0 else float("nan"),
               "seconds": seconds, "lr": lr_at(tc, max(0, st.global_step - 1), self.total_steps),
               "clip": tc.clip_for_epoch(st.epoch), "nonfinite_steps": st.nonfinite_epoch, "best": improved}
        st.history.append(rec)
        st.start_epoch_over()
        st.finished = st.bad_epochs >= tc.patience or st.epoch >= tc.epochs
        self._save_epoch(improved)
        for cb in self.callbacks:
            cb(rec)
        return rec

    def _check_diverged(self, val_loss: float) -> None:
        """Stop a run whose validation loss stays above a uniform guess's or jumps far above its best (the
        rule and its reasons: ``UNIFORM_MARGIN``); the message names the likely cause, the learning rate."""
        st, vocab = self.state, self.cfg.model.vocab_size
        uniform = math.log(vocab)
        st.epochs_above_uniform = st.epochs_above_uniform + 1 if val_loss > uniform + UNIFORM_MARGIN else 0
        if st.epochs_above_uniform >= UNIFORM_EPOCHS:
            why = (f"validation loss {val_loss:.2f} has been more than {UNIFORM_MARGIN:g} above {uniform:.2f}, the "
                   f"loss of a uniform guess over {vocab:,} tokens (log V), for {st.epochs_above_uniform} epochs")
        elif math.isfinite(st.best_val) and val_loss > st.best_val + BLOW_UP:
            why = (f"validation loss {val_loss:.2f} is {val_loss - st.best_val:.2f} above its best {st.best_val:.2f} "
                   f"(perplexity x{math.exp(val_loss - st.best_val):,.0f})")
        else:
            return
        best = self.best_path if self.best_path is not None and self.best_path.exists() else "none"
        raise DivergedError(f"the run diverged at epoch {st.epoch + 1}: {why}: the learning rate (lr={self.lr:.3g}) "
                            f"is probably too high; try lr={self.lr / 10:.3g} (or a smaller clip). Nothing is reported "
                            f"as a result; best checkpoint so far: {best}")

    def _save_epoch(self, improved: bool) -> None:
        """At an epoch's end: ``best`` when validation improved, ``epoch_K`` every ``keep_every``, and ``last``."""
        tc, st = self.cfg.train, self.state
        if self.run_dir:
            if improved:
                with self._averaged():
                    self._checkpoint(self.best_path, full=False)
            if tc.keep_every and st.epoch % tc.keep_every == 0:
                self._checkpoint(self.run_dir / f"epoch_{st.epoch}.safetensors", full=False)
            self._checkpoint(self.last_path)
        self.last_save = time.monotonic()

    def _last_good(self) -> str:
        return str(self.last_path) if self.last_path is not None and self.last_path.exists() else "none"
