"""The instruction prompt format, one for every instruction dataset (the original's Dolly format):

    Instruction: {instruction} Context: {context} Response: {response}

``Context:`` appears only when the record has one. Training text, held-out prompts and chat turns all
go through these functions, so a model is always asked in the format it was trained on.
"""

from __future__ import annotations

from ..config import BOS_ID, EOS_ID


def instruction_prompt(instruction: str, context: str = "") -> str:
    """The training format up to and including ``Response:`` (Context only when non-empty)."""
    ctx = f" Context: {context.strip()}" if context and context.strip() else ""
    return f"Instruction: {instruction.strip()}{ctx} Response:"


def instruction_text(rec: dict) -> str:
    """``Instruction: {instruction} Context: {context} Response: {response}`` (the training text)."""
    return f"{instruction_prompt(rec['instruction'], rec.get('context') or '')} {rec['response'].strip()}"


def encode_example(rec: dict, tokenizer) -> tuple[list[int], int]:
    """[BOS] prompt response [EOS] and the index where the response's tokens start."""
    prompt = tokenizer.encode(instruction_prompt(rec["instruction"], rec.get("context") or ""), add_special=False)
    response = tokenizer.encode(" " + rec["response"].strip(), add_special=False)
    return [BOS_ID, *prompt, *response, EOS_ID], 1 + len(prompt)

