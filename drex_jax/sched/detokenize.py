"""Incremental detokenization: each new token costs a decode of a few tokens, not of the whole output.

A token's text can depend on its neighbours (SentencePiece's leading space, byte-level BPE tokens
that end in the middle of a UTF-8 character, clean-up rules), so the detokenizer decodes a short
window: the tokens since the last stable point (`read`) plus the chunk before it (`prefix`) as
context, and takes the text past the context's own decoding. A window whose text ends in an
incomplete character (U+FFFD) is held until the character completes. Stop strings are searched
only in the new text and the few characters before it; a possible stop-string prefix at the end
is held back until it is decided.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"


def _rust_decoder(tokenizer):
    """A fast tokenizer's Rust decoder, to call directly: the same text as `tokenizer.decode` without
    its Python wrapping (~4x the decode itself, twice per token). None where the tokenizer changes
    decoded text in Python: a class overriding `decode`/`_decode`, or clean-up of spaces."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    cls = type(tokenizer)
    if (not isinstance(tokenizer, PreTrainedTokenizerFast) or cls.decode is not PreTrainedTokenizerFast.decode
            or cls._decode is not PreTrainedTokenizerFast._decode
            or getattr(tokenizer, "clean_up_tokenization_spaces", False)):
        return None
    return tokenizer.backend_tokenizer


class IncrementalDetokenizer:
    """Text of one request's generated tokens, built as they arrive.

    `add(token, final)` returns (text that is now safe to emit, whether a stop string ended the
    request). `text` is the request's text so far (cut before a stop string); `pending` the text of
    a window held because it ends inside a character (part of a cancelled request's text)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self._fast = _rust_decoder(tokenizer)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[prefix:read] = context; ids[read:] not yet in `text`
        self.text = self.pending = ""
        self._emitted = 0  # characters of `text` handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _step(self, extra: list[int], final: bool) -> tuple[str, str, bool]:
        """(text to append, held text, whether the window is taken) for `ids + extra`, no state change."""
        ids = self.ids + extra
        context = self._decode(ids[self._prefix:self._read])
        window = self._decode(ids[self._prefix:])
        # hold a window that ends inside a character (or shrank); a token that decodes to nothing
        # (a skipped special token) moves the window on
        if final or (len(window) >= len(context) and not window.endswith(REPLACEMENT)):
            return window[len(context):], "", True
        return "", window[len(context):], False

    def _find_stop(self, text: str, searched: int) -> int:
        """Index of the first stop string in `text` that ends past `searched`, or -1."""
        start = max(0, searched - self._longest_stop + 1)  # a stop string may straddle the boundary
        return min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)

    def would_stop(self, tokens: list[int]) -> bool:
        """Whether adding `tokens` would end the request on a stop string (no state change): what a
        decoder asks before emitting more tokens of the same request in one step."""
        if not self.stop or self.stopped:
            return self.stopped
        new, held, _ = self._step(list(tokens), False)
        return self._find_stop(self.text + new + held, len(self.text)) >= 0

    def add(self, token: int, final: bool = False, may_stop: bool = True) -> tuple[str, bool]:
        """Append a token; `may_stop` False: stop strings are not searched yet (min_tokens)."""
        if self.stopped:
            raise ValueError("this request already hit a stop string; it takes no more tokens")
        new, held, taken = self._step([int(token)], final)
        self.ids.append(int(token))
        searched = len(self.text)
        self.text += new
        if taken:
            self._prefix, self._read = self._read, len(self.ids)
        self.pending = held
        if self.stop and may_stop:
            # the held text counts too: a stop string is found at once, as in the full decode
            full = self.text + held
            cut = self._find_stop(full, searched)
            if cut >= 0:
                self.text, self.pending, self.stopped, final = full[:cut], "", True, True
        safe = len(self.text) if final else self._safe_len()
        delta = self.text[self._emitted:safe]
        self._emitted = max(self._emitted, safe)
        return delta, self.stopped

    def _safe_len(self) -> int:
        """Length of `text` that can be emitted now: not ending in a partial stop string. Looks at
        the last `longest stop` characters only."""
        n = len(self.text)
        for s in self.stop:
            for k in range(min(len(s) - 1, n), 0, -1):
                if self.text.endswith(s[:k], 0, n):
                    n -= k
                    break
        return n
