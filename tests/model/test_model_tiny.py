"""The tiny checkpoint: real config format, seeded and reproducible, idempotent writer, CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from dotsvlm_serving.model.config import load_config
from dotsvlm_serving.model.tiny import cli_main, ensure_tiny_checkpoint, is_complete_checkpoint, write_tiny_checkpoint


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_config_json_is_in_the_real_format(tiny_dir: Path) -> None:
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert raw["architectures"] == ["DotsVLMForCausalLM"] and raw["model_type"] == "dots_vlm"
    for k in ("hidden_size", "num_hidden_layers", "n_routed_experts", "kv_lora_rank", "q_lora_rank", "first_k_dense_replace",
              "rope_scaling", "image_token_id", "video_token_id"):
        assert k in raw, k  # flat DeepSeek-V3 keys at the top level
    assert raw["vision_config"]["num_hidden_layers"] == 2 and raw["vision_config"]["hidden_size"] == raw["hidden_size"]
    assert raw["num_hidden_layers"] == 2 and raw["first_k_dense_replace"] == 1
    cfg = load_config(tiny_dir)
    assert cfg.preprocess.min_pixels == 3136 and cfg.preprocess.max_pixels == 11_289_600
    assert cfg.llm_config().rope_parameters["rope_type"] == "yarn"


def test_same_seed_same_bytes_other_seed_other_weights(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_checkpoint(tmp_path / "a", seed=0)
    assert _digest(again) == _digest(tiny_dir)
    other = write_tiny_checkpoint(tmp_path / "b", seed=1)
    da, db = _digest(again), _digest(other)
    assert da["config.json"] == db["config.json"] and da["tokenizer.json"] == db["tokenizer.json"]
    assert any(da[k] != db[k] for k in da if k.endswith(".safetensors"))


def test_ensure_writes_only_when_missing_or_incomplete(tmp_path: Path) -> None:
    d = tmp_path / "m"
    assert ensure_tiny_checkpoint(d) == d and is_complete_checkpoint(d)
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    ensure_tiny_checkpoint(d)
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before  # untouched
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert not is_complete_checkpoint(d)
    ensure_tiny_checkpoint(d)
    assert is_complete_checkpoint(d)
    assert not any(p.name.startswith(".m.tmp-") for p in tmp_path.iterdir())  # temporary dirs cleaned up


def test_ensure_fills_an_existing_empty_or_partial_directory(tmp_path: Path) -> None:
    d = tmp_path / "mounted"
    d.mkdir()
    (d / "config.json").write_text("{}")  # a partial, broken write
    ensure_tiny_checkpoint(d)
    assert is_complete_checkpoint(d) and load_config(d).vision.num_hidden_layers == 2


def test_unsupported_router_is_refused(tiny_config) -> None:
    from dotsvlm_serving.model.config import DotsVLMConfig

    raw = dict(tiny_config.raw, scoring_func="softmax")
    with pytest.raises(ValueError, match="unsupported MoE router"):
        DotsVLMConfig.from_dict(raw).llm_config()


def test_cli_refuses_non_empty_dir_without_force(tmp_path: Path, capsys) -> None:
    d = tmp_path / "cli"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    args = argparse.Namespace(dir=str(d), seed=0, fp8=False, force=False)
    assert cli_main(args) == 1
    assert "not empty" in capsys.readouterr().err and not (d / "config.json").exists()
    args.force, args.fp8 = True, True
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "config.json" in out and "FP8" in out
    assert is_complete_checkpoint(d) and (d / "notes.txt").exists()


def test_init_tiny_into_a_place_it_cannot_write_says_so_without_a_traceback(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = argparse.Namespace(dir=str(blocker / "model"), seed=0, fp8=False, force=False)
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert f"cannot write the checkpoint to {blocker / 'model'}: Not a directory" in err


def test_cli_refuses_a_seed_torch_cannot_take_before_writing_anything(tmp_path: Path, capsys) -> None:
    """Before: `ValueError: Overflow when unpacking long long` from torch.Generator, after the directory was made."""
    from dotsvlm_operator.cli import main

    d = tmp_path / "big-seed"
    with pytest.raises(SystemExit) as info:
        main(["model", "init-tiny", str(d), "--seed", str(2**64)])
    assert info.value.code == 2
    assert "a seed is a 64-bit integer" in capsys.readouterr().err and not d.exists()


def test_cli_refuses_a_negative_seed_as_its_message_says(tmp_path: Path, capsys) -> None:
    """The message said "0 to 2^64-1" but -1 was taken, and wrote the same weights as seed 2^64-1 (torch's wrap)."""
    from dotsvlm_operator.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["model", "init-tiny", str(tmp_path / "m"), "--seed", "-1"])
    assert info.value.code == 2
    assert f"-1 is out of range: a seed is a 64-bit integer (0 to {2**64 - 1})" in capsys.readouterr().err
    assert build_parser().parse_args(["model", "init-tiny", "d", "--seed", str(2**64 - 1)]).seed == 2**64 - 1
    assert build_parser().parse_args(["model", "init-tiny", "d", "--seed", "0"]).seed == 0
