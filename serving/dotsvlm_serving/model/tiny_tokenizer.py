"""The tiny checkpoint's tokenizer: byte-level BPE built in code with the `tokenizers` library.

Deterministic (no training, no download): every byte is a token, a handful of fixed merges shorten
common English, and every special token of the dots-vlm template is one token. BOS/EOS sit at ids 0/1
like DeepSeek-V3's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from .prompt import TEMPLATE_SPECIAL_TOKENS, THINK_END, THINK_START

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_PAD = "<|imgpad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIALS = (BOS, EOS, PAD, *TEMPLATE_SPECIAL_TOKENS)
# Fixed merges (byte-level symbols; "Ġ" is a leading space): a few so the tokenizer is a real BPE.
_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "u"), ("Ġ", "a"),
           ("i", "s"), ("Ġ", "i"), ("Ġ", "w"), ("o", "n"), ("r", "e"), ("Ġ", "s"), ("a", "t"), ("e", "n"))


@dataclass
class TinyTokenizer:
    tokenizer: Tokenizer
    ids: dict[str, int]


def build_tiny_tokenizer() -> TinyTokenizer:
    vocab: dict[str, int] = {}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    for tok in (THINK_START, THINK_END):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES), fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    # <think> / </think> are ordinary added tokens: kept when decoding with skip_special_tokens.
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_START, THINK_END)])
    return TinyTokenizer(tk, {"bos": vocab[BOS], "eos": vocab[EOS], "pad": vocab[PAD]})


def write_tokenizer_files(tok: TinyTokenizer, model_dir: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json, loadable by transformers' PreTrainedTokenizerFast."""
    d = Path(model_dir)
    tok.tokenizer.save(str(d / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 163840,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
