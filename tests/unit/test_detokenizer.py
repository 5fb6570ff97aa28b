"""Incremental detokenizing: the pieces a request streams, token by token, add up to what decoding all its
tokens gives; a partial UTF-8 character is held back, not streamed as U+FFFD; and each token costs a
decode of a short window, not of the whole answer."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from dotsvlm_serving.engine.detokenizer import WindowStream, decode_streams
from dotsvlm_serving.model.tiny_tokenizer import build_tiny_tokenizer

TEXTS = ("the cat is in the house", "héllo wörld", "中文 在 这里", "emoji 🙂👍🏽 end", "tab\tand\nnew line",
         "  two leading spaces", "a", "ünïcödé and the rest", "ﬁ ligature € sign")


def _metaspace_tokenizer() -> Tokenizer:
    """A Llama-2 style tokenizer, built in code: '▁' for spaces, byte-fallback tokens (<0xE4>) for the
    characters it has no token for, and a decoder that strips the text's first space: a token's text
    depends on whether a token comes before it (the window's first token must not lose its space)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "▁a", "▁i", "in", "▁in", "is", "▁is"):
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("▁", "i"), ("i", "n"), ("▁i", "n"), ("i", "s"),
              ("▁i", "s")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return tk


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tokenizer(request) -> PreTrainedTokenizerFast:
    tk = build_tiny_tokenizer().tokenizer if request.param == "byte-level" else _metaspace_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False)


def _streams(tokenizer: PreTrainedTokenizerFast):
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    # The library's DecodeStream (what the engine gets for these tokenizers) and the window over a decode.
    return decode, {"DecodeStream": decode_streams(tokenizer, decode), "WindowStream": lambda: WindowStream(decode)}


def _pieces(stream, ids: list[int]) -> list[str]:
    return [p for p in (stream.step(t) for t in ids) if p is not None]


def test_streamed_pieces_add_up_to_the_full_decode_of_random_text(tokenizer: PreTrainedTokenizerFast) -> None:
    """Random text with multi-byte characters (split over byte tokens), spaces that decode differently at
    the start, and special tokens (skipped) in between: the pieces are exactly the full decode, and no piece
    carries a U+FFFD for a character whose bytes have not all arrived."""
    decode, streams = _streams(tokenizer)
    rnd = random.Random(7)
    specials = [i for i, t in tokenizer.backend_tokenizer.get_added_tokens_decoder().items() if t.special]
    for _ in range(300):
        text = " ".join(rnd.choice(TEXTS) for _ in range(rnd.randint(1, 4)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(rnd.randint(0, 3)):
            ids.insert(rnd.randint(0, len(ids)), rnd.choice(specials))
        full = decode(ids)
        assert "\ufffd" not in full
        for name, new in streams.items():
            pieces = _pieces(new(), ids)
            assert "".join(pieces) == full, (name, text, ids)
            assert not any("\ufffd" in p for p in pieces), (name, text)


def test_random_token_ids_stream_a_beginning_of_the_full_decode() -> None:
    """Any ids (bytes that are no UTF-8, specials anywhere) of a byte-level tokenizer (DeepSeek-V3's kind):
    what is streamed is the full decode's beginning, and only a partial character at the end is left for
    the engine's final decode. (Not so for byte-fallback tokens that are no UTF-8: the ByteFallback decoder
    turns a whole run of them into U+FFFD once a later one makes the run invalid, rewriting text streamed
    before; vLLM and `DecodeStream` stream the same.)"""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer().tokenizer,
                                        clean_up_tokenization_spaces=False)
    decode, streams = _streams(tokenizer)
    rnd = random.Random(11)
    vocab = len(tokenizer)
    for _ in range(300):
        ids = [rnd.randrange(vocab) for _ in range(rnd.randint(1, 40))]
        full = decode(ids)
        for name, new in streams.items():
            streamed = "".join(_pieces(new(), ids))
            assert full.startswith(streamed), (name, ids)
            assert streamed == full or full.endswith("\ufffd"), (name, ids)


def test_each_token_decodes_a_window_not_the_whole_answer() -> None:
    """The engine decoded all of a request's tokens at every step: quadratic per request. Now the ids decoded
    per token stay the same whether the answer is 1k or 4k tokens long."""
    tk = PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer().tokenizer, clean_up_tokenization_spaces=False)
    ids = tk.encode(" ".join(TEXTS) * 60, add_special_tokens=False)[:4000]
    stream, per_token = WindowStream(lambda t: tk.decode(t, skip_special_tokens=True)), []
    for t in ids:
        before = stream.decoded
        stream.step(t)
        per_token.append(stream.decoded - before)
    assert len(ids) == 4000
    # At most: a 4-byte character's 4 tokens after the 4 of the one before (the window), then its 4 again.
    assert max(per_token[:1000]) == max(per_token[3000:]) <= 12
