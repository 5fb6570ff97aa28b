"""The dots-vlm chat template, placeholder expansion and the tiny checkpoint's tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dotsvlm_serving.model.prompt import (
    STOP_STRINGS,
    TEMPLATE_SPECIAL_TOKENS,
    encode_chat,
    render_chat,
    stop_token_ids,
)

PAD = "<|imgpad|>"


def test_render_single_turn_with_images_in_place() -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                         {"type": "text", "text": "and"}, {"type": "image"}]}]
    got = render_chat(msgs, [2, 3])
    assert got == ("<|system|>You are a helpful assistant.<|endofsystem|>\n"
                   "<|user|>Compare <|img|>" + PAD * 2 + "<|endofimg|>\nand<|img|>" + PAD * 3 + "<|endofimg|>\n"
                   "<|endofuser|><|assistant|>")


def test_render_multi_turn_with_system_and_no_generation_prompt() -> None:
    msgs = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And now?"},
    ]
    got = render_chat(msgs, [1], add_generation_prompt=False)
    assert got == ("<|system|>Be terse.<|endofsystem|>\n<|user|><|img|>" + PAD + "<|endofimg|>\nWhat?<|endofuser|>"
                   "<|assistant|>A cat.<|endofassistant|><|user|>And now?<|endofuser|>")


def test_images_are_numbered_across_the_conversation() -> None:
    msgs = [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "image"}]}]
    got = render_chat(msgs, [1, 4])
    first, second = got.index(PAD), got.rindex("<|img|>")
    assert got[first:].startswith(PAD + "<|endofimg|>") and got[second:].startswith("<|img|>" + PAD * 4 + "<|endofimg|>")


@pytest.mark.parametrize(
    ("msgs", "counts", "match"),
    [
        ([{"role": "user", "content": [{"type": "image"}]}], [], "1 image parts but 0 image token counts"),
        ([{"role": "user", "content": "hi"}], [5], "0 image parts but 1"),
        ([{"role": "tool", "content": "x"}], [], "unknown role 'tool'"),
        ([{"role": "assistant", "content": [{"type": "image"}]}], [1], "images are allowed only in user messages"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], [], "only the first message"),
        ([{"role": "user", "content": "sneaky <|imgpad|>"}], [], "reserved token"),
        ([{"role": "user", "content": [{"type": "audio"}]}], [], "unknown type 'audio'"),
        ([], [], "messages is empty"),
        (["just a string"], [], "must be an object"),
    ],
)
def test_bad_conversations_are_refused(msgs, counts, match) -> None:
    with pytest.raises(ValueError, match=match):
        render_chat(msgs, counts)


def test_tiny_tokenizer_has_every_template_token_as_one_token(tiny_tokenizer, tiny_config) -> None:
    vocab = tiny_tokenizer.get_vocab()
    for tok in (*TEMPLATE_SPECIAL_TOKENS, "<think>", "</think>"):
        assert tok in vocab, tok
        assert tiny_tokenizer.encode(tok, add_special_tokens=False) == [vocab[tok]]
    assert vocab[PAD] == tiny_config.image_token_id
    assert vocab["<|video_pad|>"] == tiny_config.video_token_id
    assert len(tiny_tokenizer) == tiny_config.llm_config().vocab_size


def test_encode_chat_expands_pads_and_round_trips(tiny_tokenizer, tiny_config) -> None:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image, please."}]}]
    ids = encode_chat(tiny_tokenizer, msgs, [7])
    assert ids.count(tiny_config.image_token_id) == 7
    assert tiny_tokenizer.decode(ids) == render_chat(msgs, [7])
    pad_positions = [i for i, t in enumerate(ids) if t == tiny_config.image_token_id]
    assert pad_positions == list(range(pad_positions[0], pad_positions[0] + 7))  # contiguous, one run per image
    assert ids[pad_positions[0] - 1] == tiny_tokenizer.convert_tokens_to_ids("<|img|>")


def test_encode_chat_gives_the_ids_of_tokenizing_every_pad(tiny_tokenizer) -> None:
    """Each image's pads are expanded after tokenizing one of them: the ids are those of the fully rendered prompt,
    across turns, images beside text and beside each other."""
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare <|img| this"},
                                         {"type": "image"}, {"type": "image"}]},
            {"role": "assistant", "content": "They differ."},
            {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image"}]}]
    counts = [1275, 1, 3, 999]
    assert encode_chat(tiny_tokenizer, msgs, counts) == tiny_tokenizer.encode(render_chat(msgs, counts),
                                                                              add_special_tokens=False)
    with pytest.raises(ValueError, match="every image needs at least one"):
        encode_chat(tiny_tokenizer, msgs, [1, 0, 1, 1])


def test_stop_token_ids(tiny_tokenizer) -> None:
    ids = stop_token_ids(tiny_tokenizer)
    for s in STOP_STRINGS:
        assert tiny_tokenizer.convert_tokens_to_ids(s) in ids
    assert tiny_tokenizer.eos_token_id in ids


def test_config_and_prompt_import_without_torch() -> None:
    """The ingress and the CLI read configs and render prompts without paying for a torch import."""
    code = ("import sys, dotsvlm_serving.model, dotsvlm_serving.model.config, dotsvlm_serving.model.prompt; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_a_tokenizer_from_another_checkpoint_is_refused_at_start(tiny_tokenizer, tiny_config) -> None:
    """config.json's image_token_id must be the tokenizer's <|imgpad|>: otherwise the service starts, text works,
    and every image request gets a 400 that blames the client."""
    from dotsvlm_serving.model.prompt import check_image_token

    check_image_token(tiny_tokenizer, tiny_config.image_token_id, "/models/x")
    with pytest.raises(ValueError, match=r"/models/x/config.json gives image_token_id 128815 .* encodes <\|imgpad\|> as"):
        check_image_token(tiny_tokenizer, 128815, "/models/x")
