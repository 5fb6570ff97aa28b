"""Incremental detokenizing: each generated token's new text from a short window of the last tokens.

Decoding all of a request's tokens again at every step (what the engine did) costs a decode of the whole
answer per token, quadratic per request (about 3 ms a step at 4k tokens with the tiny tokenizer). Both
streams here keep two offsets instead, as vLLM's `detokenize_incrementally` does: the tokens from
`prefix` on are decoded, and the text beyond what the tokens from `prefix` up to `read` decode to is the
new text. Decoding the window with a few tokens before the new ones keeps what a token's text depends on
(a leading space a Metaspace decoder strips at the start of a text, the bytes of a character split across
tokens); a window whose text ends with U+FFFD (a partial UTF-8 character) gives nothing yet and grows
until the character is whole. The engine decodes all tokens once more when the request finishes, so the
answer's end (a partial character that never completed) is what a full decode gives.

`DecodeStream` (the `tokenizers` library's own, same algorithm, in Rust) is used where the tokenizer's
decode is its backend's (`decode_streams`); `WindowStream` runs the same over any `decode(ids) -> str`
(a tokenizer with transformers' space clean-up, the tests' fake decoders) and counts its work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class TokenStream(Protocol):
    def step(self, token: int) -> str | None:
        """The text the token adds, or None while it adds none that is whole yet."""


class WindowStream:
    """`DecodeStream`'s algorithm over a decode callable. `decoded` counts the token ids handed to the
    decode (the work), so tests can bound it without timing anything."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []  # the window: the tokens from `prefix` on
        self._read = 0  # in the window: the tokens before it gave the text already returned
        self._prefix_text = ""  # decode(self._ids[:self._read])
        self.decoded = 0

    def step(self, token: int) -> str | None:
        self._ids.append(token)
        text = self._decode(self._ids)
        self.decoded += len(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return None
        # A decoder that rewrites the window's earlier text (transformers' space clean-up) gives the text
        # beyond the prefix's length, as vLLM does: what was returned cannot be taken back.
        new = text[len(self._prefix_text):]
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self.decoded += len(self._ids)
        return new


class _LibraryStream:
    """`tokenizers.decoders.DecodeStream` for one request. It raises when a window's text does not begin
    with the text it returned before (a decoder that rewrites earlier text); the request then goes on
    with a `WindowStream`, which tolerates that, from the tokens whose text was not returned yet."""

    def __init__(self, backend: Any, decode: Callable[[list[int]], str]) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend, self._decode = backend, decode
        self._stream: Any = DecodeStream(skip_special_tokens=True)
        self._fallback: WindowStream | None = None
        self._unsent: list[int] = []  # the tokens since the last text returned (a partial character's)

    def step(self, token: int) -> str | None:
        if self._fallback is not None:
            return self._fallback.step(token)
        try:
            text = self._stream.step(self._backend, token)
        except Exception:  # noqa: BLE001 - the library's InvalidPrefix; any other failure of it alike
            self._fallback = fallback = WindowStream(self._decode)
            return "".join(p for t in [*self._unsent, token] if (p := fallback.step(t))) or None
        self._unsent = [] if text is not None else [*self._unsent, token]
        return text


def decode_streams(tokenizer: Any, decode: Callable[[list[int]], str]) -> Callable[[], TokenStream]:
    """A new stream per request for `tokenizer` (a transformers tokenizer), whose full decode is `decode`
    (`skip_special_tokens=True`). `DecodeStream` where transformers' decode is its backend's decode
    unchanged (no space clean-up), else `WindowStream` over `decode`, which then gives the same text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda: WindowStream(decode)
    return lambda: _LibraryStream(backend, decode)
