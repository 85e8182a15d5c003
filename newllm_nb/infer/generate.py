"""Generation with O(1) state: prime the context on the prompt once, then one ``step`` per token.

The original's chat re-encoded its whole window for every new token (O(n^2) work, context cut at
max_seq_length). Here the prompt is read once (in chunks, so a 100k-character prompt costs bounded
memory) and every new token costs one cell update, however long the text or conversation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from ..config import BOS_ID, EOS_ID, PAD_ID
from ..data.prompt import instruction_prompt
from ..data.tokenizer import tokenizer_hash
from ..kernels.available import fused_kernels
from ..kernels.decoding import ChunkDecoder, capture_graph, prime, sample_ids


@dataclass
class Sampling:
    """How to pick the next token. ``temperature=0`` or ``greedy=True`` means argmax."""

    max_new_tokens: int = 60
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; CTRL-style on tokens already seen
    greedy: bool = False
    stop: Sequence[str] = field(default_factory=lambda: ("Instruction:",))  # case-insensitive
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
                and self.max_new_tokens >= 0):
            raise ValueError(f"invalid max_new_tokens={self.max_new_tokens!r}: must be an integer >= 0")
        if not (_number(self.temperature) and 0 <= self.temperature < float("inf")):
            raise ValueError(f"invalid temperature={self.temperature!r}: must be a finite number >= 0")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"invalid top_k={self.top_k!r}: must be an integer >= 0")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"invalid top_p={self.top_p!r}: must be in (0, 1]")
        if not (_number(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf")):
            raise ValueError(f"invalid repetition_penalty={self.repetition_penalty!r}: must be a finite number > 0")
        if isinstance(self.stop, str) or not all(isinstance(x, str) for x in self.stop):
            raise ValueError(f"invalid stop={self.stop!r}: must be a list of strings")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _sampling(sampling: Optional[Sampling], overrides: dict) -> Sampling:
    return replace(sampling or Sampling(), **overrides)


# Sampling values that validation allows can still overflow float32 (a temperature of 1e39 is inf there, one
# of 1e-45 turns every logit into inf, a top-p of 1e-46 is 0). Within these bounds every product stays finite,
# and beyond them nothing changes: logits differ by at least float32's resolution (~1e-6 at their size), so a
# temperature below 1e-30 is already argmax and one above 1e30 already uniform; likewise a penalty factor.
SCALE_MIN, SCALE_MAX = 1e-30, 1e30


def _bounded(x: float) -> float:
    return min(max(float(x), SCALE_MIN), SCALE_MAX)


def pick_next(logits: torch.Tensor, s: Sampling, seen: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]; ``seen`` [B, V] bool marks tokens for the repetition penalty."""
    logits = logits.float().clone()
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[[PAD_ID, BOS_ID]] = True
    logits = logits.masked_fill(banned, float("-inf"))
    if s.repetition_penalty != 1.0 and seen is not None:
        p = _bounded(s.repetition_penalty)
        pen = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(seen, pen, logits)
    if s.greedy or s.temperature == 0:
        return logits.argmax(-1)
    # Shifted so the largest is 0 before dividing: every scaled logit is <= 0, so none overflows to +inf.
    logits = (logits - logits.amax(-1, keepdim=True)) / _bounded(s.temperature)
    logits = logits.nan_to_num(nan=float("-inf")).masked_fill(banned, float("-inf"))
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p_sorted = sorted_logits.softmax(-1)
        drop = p_sorted.cumsum(-1) - p_sorted >= s.top_p  # keep the smallest set reaching top_p
        drop[:, 0] = False  # and always the most likely token (a top_p below float32's smallest is 0 there)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generator(s: Sampling, device: torch.device) -> Optional[torch.Generator]:
    return None if s.seed is None else torch.Generator(device=device).manual_seed(s.seed)


def _check_steppable(model) -> None:
    if not callable(getattr(model, "step", None)):
        raise ValueError(f"generation needs a New-LLM model (one context vector, `step`); got {type(model).__name__}: "
                         "train or load a New-LLM checkpoint (arch='newllm')")


def check_pair(model, tokenizer) -> None:
    """The tokenizer must be the model's own: same vocabulary size, and the same tokenizer where the model
    knows its hash (``load_model`` and ``run_experiment`` record it); else ids would mean other words."""
    _check_steppable(model)
    if not hasattr(tokenizer, "encode") or not isinstance(getattr(tokenizer, "vocab_size", None), int):
        raise ValueError(f"not a tokenizer: {type(tokenizer).__name__}")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer and model do not match: the tokenizer has {tokenizer.vocab_size:,} ids, the model "
                         f"{model.config.vocab_size:,}; use the tokenizer from the model's checkpoint (load_model)")
    known = getattr(model, "tokenizer_sha256", None)
    if known is not None and tokenizer_hash(tokenizer) != known:
        raise ValueError("tokenizer and model do not match: this tokenizer is not the one the model was trained with; "
                         "use the tokenizer from the model's checkpoint (load_model)")


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text (str), got {type(prompt).__name__}")
    return prompt


@torch.no_grad()
def iter_tokens(model, prompt_ids: torch.Tensor, sampling: Optional[Sampling] = None,
                context: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(token [B], logits it was drawn from [B, V], context after reading it [B, C])`` per new token.

    ``prompt_ids`` [B, T] may be right-padded with ``lengths`` giving each row's length; the
    context is taken at each row's last real token. Stops after ``max_new_tokens`` (callers stop earlier).
    """
    s = sampling or Sampling()
    _check_steppable(model)
    model.eval()
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    B = prompt_ids.shape[0]
    if lengths is None:
        logits, ctx = prime(model, prompt_ids, context)
    else:  # one forward for a right-padded batch; read each row's state at its own last token
        all_logits, _, traj = model(prompt_ids, context, return_trajectory=True)
        last = (lengths.to(device) - 1).clamp(min=0)
        rows = torch.arange(B, device=device)
        logits, ctx = all_logits[rows, last], traj[rows, last]
    seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
    seen.scatter_(1, prompt_ids.clamp(max=logits.shape[-1] - 1), True)
    gen = _generator(s, device)
    for _ in range(s.max_new_tokens):
        tok = pick_next(logits, s, seen, gen)
        seen[torch.arange(B, device=device), tok] = True
        step_logits = logits
        logits, ctx = model.step(tok, ctx)
        yield tok, step_logits, ctx


class GraphDecoder(ChunkDecoder):
    """``chunk`` consecutive single-token steps (cell update + greedy / Gumbel-max sampling) captured in
    one CUDA graph, captured once and replayed for any number of tokens. Device memory is constant:
    ids leave the GPU chunk by chunk into pinned host memory."""

    def __init__(self, model, batch_size: int = 1, chunk: int = 32, temperature: float = 0.0) -> None:
        self.model, self.B, self.chunk, self.temperature = model.eval(), batch_size, chunk, temperature
        self.use_graph = True
        dev = next(model.parameters()).device
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.ctx = model.init_context(batch_size)
        self.out = torch.empty(batch_size, chunk, dtype=torch.long, device=dev)
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    @torch.no_grad()
    def _body(self) -> None:
        t, c = self.tok, self.ctx
        for j in range(self.chunk):
            self.out[:, j] = t
            lg, c = self.model.step(t, c)
            t = sample_ids(lg, self.temperature, None)
        self.tok.copy_(t)
        self.ctx.copy_(c)

    def _capture(self) -> None:
        saved = self.tok.clone(), self.ctx.clone()
        self.graph = capture_graph(self._body)
        self.tok.copy_(saved[0])
        self.ctx.copy_(saved[1])

    def _start(self, context: torch.Tensor) -> None:
        self.ctx.copy_(context)


def graph_decoder(model, batch_size: int = 1, chunk: Optional[int] = None, temperature: float = 0.0):
    """The fastest captured decoder for ``model`` here: ``fused.FusedDecoder`` on a GPU where the Triton kernels
    run (the cells ``fused.fused_cell_supported`` accepts), else ``GraphDecoder``, with one printed line saying
    why. ``chunk``: tokens per graph replay (default: each decoder's own)."""
    device = next(model.parameters()).device
    fused, why = fused_kernels(device)
    ok = fused is not None
    if ok:
        ok, why = fused.fused_cell_supported(model.config)
    if ok:
        dec = fused.FusedDecoder(model, batch_size, chunk, temperature)
        if model.config.original_cell:
            return dec
        try:  # the option kernels' first use (compile + capture) here, so that a failure falls back in one line
            dec.run(torch.full((batch_size, 1), BOS_ID), 1)
            return dec
        except Exception as e:
            why = f"the fused decode kernels failed for this cell ({type(e).__name__}: {str(e)[:100]})"
    print(f"fused decoder unavailable ({why}); decoding with the CUDA-graph step")
    return GraphDecoder(model, batch_size, chunk or 32, temperature)


# Rows up to which the weight-stationary decoder is the faster greedy decoder: it works through a batch row by row,
# while the fused decoder's matrix products take many rows at once (NEWLLM_PDEC_MAX_BATCH overrides).
PERSISTENT_MAX_BATCH = 8
_SAID: set = set()  # the reasons persistent_decoder has printed


def persistent_decoder(model, batch_size: int = 1, chunk: Optional[int] = None, max_batch: Optional[int] = None):
    """Greedy decoding with the weights kept on chip (``persistent.PersistentDecoder``: one cooperative Triton
    launch a chunk of tokens) for batches up to ``max_batch`` rows (default PERSISTENT_MAX_BATCH) where it runs,
    else ``graph_decoder``'s choice: past ``max_batch`` silently, otherwise after one printed line saying why (no
    GPU or Triton, a Triton without the cooperative launch, a cell or head it lacks, a grid that cannot be
    co-resident)."""
    device = next(model.parameters()).device
    fused, _ = fused_kernels(device)
    limit = max_batch or int(os.environ.get("NEWLLM_PDEC_MAX_BATCH", "0") or 0) or PERSISTENT_MAX_BATCH
    if fused is None or batch_size > limit:
        return graph_decoder(model, batch_size, chunk)  # which says in one line why it has no fused kernels
    from ..kernels import persistent  # optional: needs triton

    ok, why = persistent.cooperative_launch_available()
    if ok:
        ok, why = persistent.persistent_supported(model.config)
    if ok:
        try:
            dec = persistent.PersistentDecoder(model, batch_size, chunk)
            dec.run(torch.full((batch_size, 1), BOS_ID), 1)  # compile and the cooperative launch, here
            return dec
        except Exception as e:  # ValueError: what it lacks; RuntimeError: the driver refused the grid
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if why not in _SAID:  # each reason once a process: decode_ids asks again on every call
        _SAID.add(why)
        print(f"persistent decoder unavailable ({why}); decoding with graph_decoder's choice")
    return graph_decoder(model, batch_size, chunk)


@torch.no_grad()
def decode_ids(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
               use_graph: Optional[bool] = None, chunk: Optional[int] = None) -> torch.Tensor:
    """Bulk generation of token ids [B, max_new_tokens] (returned on the CPU), no stop conditions.
    On CUDA, greedy decoding of up to ``PERSISTENT_MAX_BATCH`` rows keeps the weights on chip
    (``persistent_decoder``); otherwise, or where that does not run, the fused Triton decoder (fused.py), else a
    ``GraphDecoder``. Elsewhere (or ``use_graph=False``) the eager step loop."""
    device = next(model.parameters()).device
    model.eval()
    if use_graph if use_graph is not None else device.type == "cuda":
        B = prompt_ids.shape[0]
        dec = persistent_decoder(model, B, chunk) if temperature == 0 else graph_decoder(model, B, chunk, temperature)
        return dec.run(prompt_ids, max_new_tokens, seed)
    logits, ctx = prime(model, prompt_ids.to(device))
    gen = torch.Generator(device=device).manual_seed(seed)
    tok = sample_ids(logits, temperature, gen)
    out = torch.empty(prompt_ids.shape[0], max_new_tokens, dtype=torch.long)
    for i in range(max_new_tokens):
        out[:, i] = tok.cpu()
        logits, ctx = model.step(tok, ctx)
        tok = sample_ids(logits, temperature, gen)
    return out


def encode_prompt(tokenizer, text: str, bos: bool = True) -> list[int]:
    ids = tokenizer.encode(text, add_special=False)
    return ([BOS_ID] if bos else []) + ids


class _TextAssembler:
    """Turn token ids into text incrementally, holding back what could still become a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tok, self.stop = tokenizer, [s.lower() for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._pending: list[int] = []

    def add(self, token_id: int) -> str:
        before = len(self.text)
        if getattr(self.tok, "kind", "word") == "word":
            self.text += self.tok.decode_token(token_id)
        else:  # byte-level BPE: a character may span tokens; wait until it decodes cleanly
            self._pending.append(token_id)
            piece = self.tok.decode(self._pending)
            if piece.endswith("\ufffd"):
                return ""
            self.text += piece
            self._pending = []
        hold = max((len(s) - 1 for s in self.stop), default=0)
        # Only text that the new piece can complete is searched: O(1) per token, not O(length).
        start = max(0, before - hold)
        low = self.text[start:].lower()
        hits = [start + low.find(s) for s in self.stop if s in low]
        if hits:
            self.text = self.text[: min(hits)].rstrip()
            self.stopped = True
            return self.flush()
        safe = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted:safe], safe
        return out

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


def stream(model, tokenizer, prompt: str, sampling: Optional[Sampling] = None,
           context: Optional[torch.Tensor] = None, state: Optional[dict] = None, **overrides) -> Iterator[str]:
    """Yield text pieces as they are generated. Stops at EOS, a stop string, or ``max_new_tokens``.

    ``state`` (optional dict) receives ``context`` (after the last token read) and ``tokens``.
    """
    s = _sampling(sampling, overrides)
    check_pair(model, tokenizer)
    ids = torch.tensor([encode_prompt(tokenizer, _check_prompt(prompt), bos=context is None)])
    if ids.shape[1] == 0:  # continuing a context with an empty prompt: there is no token to read
        raise ValueError("empty prompt: nothing to condition on")
    asm = _TextAssembler(tokenizer, s.stop)
    ctx = None
    for tok, _, new_ctx in iter_tokens(model, ids, s, context):
        ctx = new_ctx
        t = int(tok)
        asm.ids.append(t)
        if t == EOS_ID:
            break
        piece = asm.add(t)
        if piece:
            yield piece
        if asm.stopped:
            break
    tail = "" if asm.stopped else asm.flush()
    if tail:
        yield tail
    if state is not None:
        state["context"], state["tokens"] = ctx, asm.ids


def generate(model, tokenizer, prompt: str, sampling: Optional[Sampling] = None, **overrides) -> str:
    """The whole continuation of ``prompt`` as one string."""
    return "".join(stream(model, tokenizer, prompt, sampling, **overrides)).strip()


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], sampling: Optional[Sampling] = None,
                   **overrides) -> list[str]:
    """Continue several prompts at once (one primed batch, one ``step`` per token for all rows)."""
    s = _sampling(sampling, overrides)
    check_pair(model, tokenizer)
    if isinstance(prompts, str):
        raise ValueError("generate_batch takes a list of prompts; for one prompt use generate()")
    if not prompts:
        raise ValueError("generate_batch got no prompts")
    enc = [encode_prompt(tokenizer, _check_prompt(p)) for p in prompts]
    lengths = torch.tensor([len(e) for e in enc])
    ids = torch.full((len(enc), int(lengths.max())), PAD_ID, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
    asms = [_TextAssembler(tokenizer, s.stop) for _ in prompts]
    done = [False] * len(prompts)
    for tok, _, _ in iter_tokens(model, ids, s, lengths=lengths):
        for i, t in enumerate(tok.tolist()):
            if done[i]:
                continue
            if t == EOS_ID:
                done[i] = True
                continue
            asms[i].add(t)
            done[i] = asms[i].stopped
        if all(done):
            break
    return [a.text.strip() for a in asms]


class ChatSession:
    """Multi-turn chat that keeps the context vector across turns.

    Each turn is formatted like the instruction training text (``Instruction: ... Response:``); the reply's
    tokens are read into the same context, so a new token costs the same however long the talk.
    """

    EMPTY_MESSAGE = "(Type a message first: empty input was not sent to the model.)"

    def __init__(self, model, tokenizer, sampling: Optional[Sampling] = None, **overrides) -> None:
        check_pair(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.sampling = _sampling(sampling, overrides)
        self.reset()

    def reset(self) -> None:
        self.context: Optional[torch.Tensor] = None
        self.turns: list[tuple[str, str]] = []
        self.tokens_read = 0

    def stream(self, message: str, context_text: str = "") -> Iterator[str]:
        """Yield the reply in pieces. Empty / whitespace-only input yields a message, no model call."""
        if not isinstance(message, str) or not message.strip():
            yield self.EMPTY_MESSAGE
            return
        prompt = instruction_prompt(" ".join(message.split()), context_text)
        state: dict = {}
        parts = []
        for piece in stream(self.model, self.tokenizer, prompt, self.sampling, context=self.context, state=state):
            parts.append(piece)
            yield piece
        reply = "".join(parts).strip()
        ctx = state.get("context")
        if ctx is not None:
            self.context = ctx
        self.tokens_read += len(encode_prompt(self.tokenizer, prompt)) + len(state.get("tokens", []))
        self.turns.append((message, reply))

    def send(self, message: str, context_text: str = "") -> str:
        return "".join(self.stream(message, context_text)).strip()
