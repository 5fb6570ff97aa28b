"""The dots-vlm chat template, image placeholder expansion and the checkpoint's tokenizer.

Template (one string, no BOS):
    <|system|>{system}<|endofsystem|>\\n
    <|user|>{content}<|endofuser|><|assistant|>{content}<|endofassistant|>...<|assistant|>
Each image part becomes `<|img|>` + N x `<|imgpad|>` + `<|endofimg|>` + "\\n" where it stands in the
content; N is that image's token count from preprocessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerFast

SYSTEM, END_SYSTEM = "<|system|>", "<|endofsystem|>"
USER, END_USER = "<|user|>", "<|endofuser|>"
ASSISTANT, END_ASSISTANT = "<|assistant|>", "<|endofassistant|>"
IMG_START, IMG_PAD, IMG_END = "<|img|>", "<|imgpad|>", "<|endofimg|>"
VIDEO_PAD = "<|video_pad|>"
ENDOFTEXT = "<|endoftext|>"
THINK_START, THINK_END = "<think>", "</think>"
STOP_STRINGS = (ENDOFTEXT, END_ASSISTANT)
DEFAULT_SYSTEM = "You are a helpful assistant."

# Every special token the template uses; the tiny tokenizer holds all of them.
TEMPLATE_SPECIAL_TOKENS = (SYSTEM, END_SYSTEM, USER, END_USER, ASSISTANT, END_ASSISTANT,
                           IMG_START, IMG_PAD, IMG_END, VIDEO_PAD, ENDOFTEXT)
# User text must not smuggle these in: they would shift the image-pad count or fake a turn.
_RESERVED_IN_TEXT = (IMG_START, IMG_PAD, IMG_END, VIDEO_PAD)

_ROLE_TAGS = {"user": (USER, END_USER), "assistant": (ASSISTANT, END_ASSISTANT)}


def load_tokenizer(model_dir: str | Path) -> "PreTrainedTokenizerFast":
    """The checkpoint's fast tokenizer (tokenizer.json + tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    d = Path(model_dir)
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{d / 'tokenizer.json'} not found: the checkpoint directory needs its tokenizer files")
    return PreTrainedTokenizerFast.from_pretrained(str(d))


def check_image_token(tokenizer: Any, image_token_id: int, model_dir: str | Path) -> None:
    """Refuse to start when the tokenizer's <|imgpad|> is not the id the model puts image embeddings at: text
    would work and every image request would fail with a 400 that blames the client."""
    found = tokenizer.convert_tokens_to_ids(IMG_PAD)
    if found != image_token_id or found == tokenizer.unk_token_id:
        raise ValueError(
            f"{Path(model_dir) / 'config.json'} gives image_token_id {image_token_id} (128815 when it has none), "
            f"but the tokenizer in {model_dir} encodes {IMG_PAD} as {found}: the tokenizer files and config.json "
            f"are from different checkpoints; use the pair of one dots.vlm1 checkpoint")


def _parts(content: Any, role: str, index: int) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise ValueError(f"messages[{index}].content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}].content[{j}] is a text part without a string 'text'")
            out.append(part)
        elif kind == "image":
            if role != "user":
                raise ValueError(f"messages[{index}] ({role}) has an image part: images are allowed only in user messages")
            out.append(part)
        else:
            raise ValueError(f"messages[{index}].content[{j}] has unknown type {kind!r}: use 'text' or 'image'")
    return out


def _text(text: str, index: int) -> str:
    for tok in _RESERVED_IN_TEXT:
        if tok in text:
            raise ValueError(f"messages[{index}] contains the reserved token {tok!r} in its text: remove it")
    return text


def count_images(messages: list[dict[str, Any]]) -> int:
    """Image parts across the whole conversation."""
    n = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        n += sum(1 for p in _parts(m.get("content"), m.get("role", "user"), i) if p["type"] == "image")
    return n


def render_chat(messages: list[dict[str, Any]], image_token_counts: list[int], *, add_generation_prompt: bool = True,
                default_system: str = DEFAULT_SYSTEM) -> str:
    """The prompt string. A leading system message replaces the default one; images are numbered in order
    of appearance across the conversation and expanded to `image_token_counts[i]` pad tokens."""
    if not messages:
        raise ValueError("messages is empty: send at least one user message")
    n_images = count_images(messages)
    if n_images != len(image_token_counts):
        raise ValueError(f"the messages have {n_images} image parts but {len(image_token_counts)} image token counts were given")
    system = default_system
    out: list[str] = []
    img = 0
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "system":
            if i != 0:
                raise ValueError(f"messages[{i}] is a system (or developer) message: only the first message may be one")
            system = "".join(_text(p["text"], i) for p in _parts(m.get("content"), "system", i))
            continue
        if role not in _ROLE_TAGS:
            raise ValueError(f"messages[{i}] has unknown role {role!r}: use 'system', 'user' or 'assistant'")
        start, end = _ROLE_TAGS[role]
        body = []
        for p in _parts(m.get("content"), role, i):
            if p["type"] == "text":
                body.append(_text(p["text"], i))
            else:
                n = int(image_token_counts[img])
                if n <= 0:
                    raise ValueError(f"image {img} has {n} tokens: every image needs at least one")
                body.append(IMG_START + IMG_PAD * n + IMG_END + "\n")
                img += 1
        out.append(start + "".join(body) + end)
    prompt = f"{SYSTEM}{system}{END_SYSTEM}\n" + "".join(out)
    if add_generation_prompt:
        prompt += ASSISTANT
    return prompt


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]], image_token_counts: list[int], *,
                add_generation_prompt: bool = True, image_token_id: int | None = None) -> list[int]:
    """Token ids of the rendered prompt; checks that the pad tokens came out exactly as counted.

    The prompt is tokenized with one pad per image, and each pad id is then repeated its image's count: the
    same ids as tokenizing every pad (a special token is always one id, whatever is beside it), without
    tokenizing ~1000 pads per image (8 large images: 115k pads, ~0.1 s of CPU per request)."""
    counts = [int(n) for n in image_token_counts]
    bad = [n for n in counts if n <= 0]
    if bad:
        raise ValueError(f"an image has {bad[0]} tokens: every image needs at least one")
    text = render_chat(messages, [1] * len(counts), add_generation_prompt=add_generation_prompt)
    ids = tokenizer.encode(text, add_special_tokens=False)
    pad_id = image_token_id if image_token_id is not None else tokenizer.convert_tokens_to_ids(IMG_PAD)
    found = sum(1 for t in ids if t == pad_id)
    if found != len(counts):
        raise ValueError(f"the prompt tokenised to {found} image-pad tokens, expected {len(counts)}: "
                         "the tokenizer does not treat <|imgpad|> as one special token")
    if not counts:
        return list(ids)
    out: list[int] = []
    image = 0
    for t in ids:
        if t == pad_id:
            out.extend([t] * counts[image])
            image += 1
        else:
            out.append(t)
    return out


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end generation: the stop strings that are single tokens, plus the tokenizer's EOS."""
    ids: list[int] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for s in STOP_STRINGS:
        tid = tokenizer.convert_tokens_to_ids(s)
        if isinstance(tid, int) and tid != unk and tid not in ids:
            ids.append(tid)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and eos not in ids:
        ids.append(eos)
    return ids
