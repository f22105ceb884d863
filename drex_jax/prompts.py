"""Prompts to token ids: text through the tokenizer (or its chat template), or ids checked against
the vocabulary. Every bad prompt is a ValueError that says what to send instead."""
from __future__ import annotations

import numpy as np


def encode_prompt(tokenizer, vocab_size: int, prompt: str | list[int], chat: bool = False) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty; give at least one character or token")
        if tokenizer is None:
            raise ValueError("this engine has no tokenizer; pass prompts as lists of token ids")
        if chat:
            return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
        ids = list(tokenizer(prompt).input_ids)
        if not ids:  # e.g. control characters the tokenizer drops
            raise ValueError(f"prompt {prompt[:40]!r} encodes to no tokens; give text the tokenizer keeps")
        return ids
    ids = list(prompt)
    if not ids:
        raise ValueError("prompt is empty; give at least one token")
    bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be ints in [0, {vocab_size}), got {bad[:5]}")
    return [int(t) for t in ids]


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of a conversation through the model's chat template, ending with the assistant's turn."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
    if not messages:
        raise ValueError("messages is empty; give at least one message")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
