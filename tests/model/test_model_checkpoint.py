"""Checkpoint loading: split vision/LLM reads, round trip, clear errors, FP8 dequantisation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dotsvlm_serving.model import checkpoint as ckpt
from dotsvlm_serving.model import fp8
from dotsvlm_serving.model.checkpoint import CheckpointError, load_llm, load_vision_tower, save_checkpoint


def _index(d: Path) -> dict[str, str]:
    return json.loads((d / ckpt.INDEX_NAME).read_text())["weight_map"]


def test_checkpoint_uses_per_expert_keys_and_vision_has_its_own_shards(tiny_dir: Path) -> None:
    wm = _index(tiny_dir)
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in wm
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in wm
    assert not any("gate_up_proj" in k for k in wm)
    vision_files = {f for k, f in wm.items() if k.startswith("vision_tower.")}
    llm_files = {f for k, f in wm.items() if not k.startswith("vision_tower.")}
    assert vision_files and llm_files and not vision_files & llm_files
    assert len(set(wm.values())) > 2  # really sharded


def _record_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = ckpt.safe_open

    def spy(path, *a, **kw):
        opened.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(ckpt, "safe_open", spy)
    return opened


def test_vision_and_llm_loaders_open_only_their_own_shards(tiny_dir: Path, monkeypatch) -> None:
    wm = _index(tiny_dir)
    vision_files = {f for k, f in wm.items() if k.startswith("vision_tower.")}
    opened = _record_opens(monkeypatch)
    load_vision_tower(tiny_dir)
    assert opened and set(opened) <= vision_files
    opened.clear()
    load_llm(tiny_dir)
    assert opened and not set(opened) & vision_files


def test_load_save_load_round_trip(tiny_dir: Path, tiny_config, tmp_path: Path) -> None:
    tower, llm = load_vision_tower(tiny_dir), load_llm(tiny_dir)
    out = save_checkpoint(tmp_path / "copy", vision_state=tower.state_dict(), llm_state=llm.state_dict(),
                          config=tiny_config.raw, shard_max_bytes=100_000)
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(tiny_dir / f, out / f)
    assert set(_index(out)) == set(_index(tiny_dir))
    tower2, llm2 = load_vision_tower(out), load_llm(out)
    for a, b in ((tower, tower2), (llm, llm2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(d: Path, key: str, tensor: torch.Tensor | None) -> str:
    """Replace (or drop, with None) one tensor in its shard; returns the shard's name."""
    name = _index(d)[key]
    tensors = load_file(str(d / name))
    if tensor is None:
        del tensors[key]
    else:
        tensors[key] = tensor
    save_file(tensors, str(d / name))
    return name


def test_mis_shaped_tensor_names_tensor_shapes_and_file(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "bad")
    key = "vision_tower.blocks.1.attn.qkv.weight"
    shard = _rewrite(d, key, torch.zeros(100, 64))
    with pytest.raises(CheckpointError) as err:
        load_vision_tower(d)
    msg = str(err.value)
    assert key in msg and "expected shape [192, 64]" in msg and "found [100, 64]" in msg and shard in msg
    assert "config.json" in msg  # what to look at: the config's sizes or the tensors (was: the shapes alone)


def test_mis_shaped_expert_tensor_is_reported_by_its_checkpoint_name(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "bad")
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    _rewrite(d, key, torch.zeros(32, 63))
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj\.weight.*expected shape \[32, 64\], found \[32, 63\]"):
        load_llm(d)


def test_missing_and_unexpected_tensors(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "missing")
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    # drop it from both the shard and the index, as a checkpoint that never had it
    _rewrite(d, key, None)
    idx = json.loads((d / ckpt.INDEX_NAME).read_text())
    del idx["weight_map"][key]
    (d / ckpt.INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.kv_b_proj\.weight' \(shape \[128, 16\]\) is missing"):
        load_llm(d)
    load_vision_tower(d)  # the vision replica does not care

    d2 = _copy(tiny_dir, tmp_path / "extra")
    name = _index(d2)["vision_tower.post_trunk_norm.weight"]
    tensors = load_file(str(d2 / name))
    tensors["vision_tower.blocks.0.attn.qkv.bias"] = torch.zeros(192)
    save_file(tensors, str(d2 / name))
    idx = json.loads((d2 / ckpt.INDEX_NAME).read_text())
    idx["weight_map"]["vision_tower.blocks.0.attn.qkv.bias"] = name
    (d2 / ckpt.INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"unexpected vision tensor.*vision_tower\.blocks\.0\.attn\.qkv\.bias"):
        load_vision_tower(d2)


def test_mtp_layers_are_ignored_and_index_is_optional(tiny_dir: Path, tiny_llm, tmp_path: Path) -> None:
    d = tmp_path / "single"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(tiny_dir / f, d / f)
    tensors = {}
    for name in sorted(set(_index(tiny_dir).values())):
        tensors.update(load_file(str(tiny_dir / name)))
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)  # a multi-token-prediction layer
    save_file(tensors, str(d / "model.safetensors"))
    llm = load_llm(d)
    for k, v in tiny_llm.state_dict().items():
        assert torch.equal(v, llm.state_dict()[k]), k


def test_fp8_quantize_dequantize_blocks() -> None:
    w = torch.randn(200, 300) * torch.linspace(0.01, 3, 300)  # column scales differ across blocks
    q, s = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3) and s.dtype == torch.float32
    back = fp8.dequantize(q, s)
    expanded = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4, subnormal step 2^-9 of the block scale
    assert bool(((back - w).abs() <= w.abs() * 2**-4 + expanded * 2**-9 + 1e-12).all())


def test_fp8_checkpoint_loads_as_the_dequantized_reference(tiny_dir: Path, tiny_fp8_dir: Path) -> None:
    cfg = json.loads((tiny_fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    wm = _index(tiny_fp8_dir)
    key = "model.layers.1.mlp.experts.3.down_proj.weight"
    with safe_open(str(tiny_fp8_dir / wm[key]), "pt") as f:
        q = f.get_tensor(key)
    with safe_open(str(tiny_fp8_dir / wm[key + "_scale_inv"]), "pt") as f:
        s = f.get_tensor(key.replace("weight", "weight_scale_inv"))
    assert q.dtype == torch.float8_e4m3fn and s.shape == (1, 1)  # dims < 128: one block
    assert "model.embed_tokens.weight_scale_inv" not in wm and "model.layers.1.mlp.gate.weight_scale_inv" not in wm

    llm8, llm32 = load_llm(tiny_fp8_dir), load_llm(tiny_dir)
    # exact: the loaded weight is the stored FP8 value times its block scale
    ref = q.float() * s
    torch.testing.assert_close(llm8.model.layers[1].mlp.experts.down_proj[3], ref, atol=0, rtol=0)
    # close to the full-precision weights it was quantized from (e4m3 bound, see above)
    s8, s32 = llm8.state_dict(), llm32.state_dict()
    for k in s32:
        w, got = s32[k], s8[k]
        bound = w.abs() * 2**-4 + w.abs().max() / 448 * 2**-9 + 1e-12
        assert bool(((got - w).abs() <= bound).all()), k
    # and the model computes nearly the same thing
    ids = torch.tensor([[3, 40, 41, 42, 7]])
    with torch.inference_mode():
        a, b = llm32(input_ids=ids).logits, llm8(input_ids=ids).logits
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_fp8_checkpoint_in_bfloat16(tiny_fp8_dir: Path) -> None:
    llm = load_llm(tiny_fp8_dir, dtype=torch.bfloat16)
    assert llm.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert llm.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    with torch.inference_mode():
        out = llm(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out.float()).all()


def test_an_unreadable_shard_or_index_is_named_among_the_files(tiny_dir: Path, tmp_path: Path) -> None:
    """The real checkpoint has ~150 shards: a partial download must say which file to fetch again."""
    from dotsvlm_serving.model.config import load_config

    d = _copy(tiny_dir, tmp_path / "cut")
    shard = d / _index(d)["model.embed_tokens.weight"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"shard {shard} cannot be read.*download it again"):
        load_llm(d)
    d = _copy(tiny_dir, tmp_path / "index")
    (d / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not a valid index"):
        load_vision_tower(d)
    (d / "config.json").write_text('{"a": 1,')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_config(d)


class _FailingHandle:
    """A shard handle whose reads fail the way the operating system or the machine fails them."""

    def __init__(self, real, exc: BaseException) -> None:
        self._real, self._exc = real, exc

    def __enter__(self):
        self._real.__enter__()
        return self

    def __exit__(self, *a):
        return self._real.__exit__(*a)

    def keys(self):
        return self._real.keys()

    def get_slice(self, key):
        return self._real.get_slice(key)

    def get_tensor(self, key):
        raise self._exc


@pytest.mark.parametrize("exc", [OSError(5, "Input/output error"), OSError(13, "Permission denied")])
def test_an_io_failure_blames_the_volume_not_the_download(tiny_dir: Path, monkeypatch, exc: OSError) -> None:
    """An NFS mount that drops mid-load must not send the user to download 600 GB again."""
    real = ckpt.safe_open
    monkeypatch.setattr(ckpt, "safe_open", lambda *a, **k: _FailingHandle(real(*a, **k), exc))
    with pytest.raises(CheckpointError) as info:
        load_vision_tower(tiny_dir)
    msg = str(info.value)
    assert exc.strerror in msg and "volume" in msg and "download" not in msg
    monkeypatch.setattr(ckpt, "safe_open", lambda *a, **k: (_ for _ in ()).throw(exc))
    with pytest.raises(CheckpointError, match=f"{exc.strerror}.*volume"):
        load_vision_tower(tiny_dir)


def test_running_out_of_memory_is_not_reported_as_a_bad_checkpoint(tiny_dir: Path, monkeypatch) -> None:
    real = ckpt.safe_open
    monkeypatch.setattr(ckpt, "safe_open", lambda *a, **k: _FailingHandle(real(*a, **k), MemoryError()))
    with pytest.raises(MemoryError):
        load_llm(tiny_dir)


def _with_config(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint whose config.json is `edit`ed (only the small files: no shard is read)."""
    dst.mkdir()
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copy(src / f, dst / f)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("edit, said", [
    (lambda c: c.update(image_token_id="abc"), r"'image_token_id' must be a non-negative integer token id \(found 'abc'\)"),
    (lambda c: c.update(video_token_id=None), r"'video_token_id' must be a non-negative integer token id \(found None\)"),
    (lambda c: c["vision_config"].update(embed_dim="wide"), r"vision_config\.embed_dim: Input should be a valid integer"),
    (lambda c: c.update(vision_config=[64]), r"vision_config: Input should be a valid dictionary"),
    (lambda c: c.update(quantization_config=["fp8"]), r"'quantization_config' must be an object"),
    (lambda c: c.update(quantization_config={"weight_block_size": [0, 128]}),
     r"'quantization_config\.weight_block_size' must be two positive integers.*found \[0, 128\]"),
])
def test_a_config_key_of_the_wrong_type_names_the_file_and_the_key(tiny_dir: Path, tmp_path: Path, edit, said) -> None:
    """Before: `int()`'s "invalid literal ... 'abc'", a pydantic error that named neither file nor section, an
    AttributeError, or (block size 0) a ZeroDivisionError deep in the FP8 loader."""
    from dotsvlm_serving.model.config import load_config

    d = _with_config(tiny_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=said) as info:
        load_config(d)
    msg = str(info.value)
    assert msg.startswith(f"{d / 'config.json'}: ") and "\n" not in msg  # (Serve's status shows the last line only)


@pytest.mark.parametrize("edit, said", [
    (lambda c: c.update(num_hidden_layers=2.5), r"field 'num_hidden_layers'.*expected int, got float"),
    (lambda c: c.update(hidden_size="64"), r"field 'hidden_size'.*expected int, got str"),
    (lambda c: c.pop("hidden_size"), r"LLM hidden_size \(7168, the default: the key is missing\)"),
])
def test_a_language_model_key_of_the_wrong_type_names_the_file_and_the_key(tiny_dir: Path, tmp_path: Path, edit,
                                                                         said) -> None:
    from dotsvlm_serving.model.config import load_config

    d = _with_config(tiny_dir, tmp_path / "bad", edit)
    cfg = load_config(d)  # (the ingress reads no LLM key: it still starts)
    with pytest.raises(ValueError, match=said) as info:
        cfg.llm_config()
    assert str(d / "config.json") in str(info.value) and "\n" not in str(info.value)


def test_a_shard_left_as_a_git_lfs_pointer_says_to_fetch_the_lfs_objects(tiny_dir: Path, tmp_path: Path) -> None:
    """`git clone` of a Hugging Face repository without Git LFS: downloading "again" the same way would not help."""
    d = _copy(tiny_dir, tmp_path / "lfs")
    shard = d / _index(d)["vision_tower.post_trunk_norm.weight"]
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 5368709120\n")
    with pytest.raises(CheckpointError, match=f"shard {shard} is a Git LFS pointer.*git lfs pull"):
        load_vision_tower(d)


@pytest.mark.parametrize("weight_map, found", [
    (["model.norm.weight"], "found a list"),
    ({"model.norm.weight": 5}, "found 'model.norm.weight': 5"),
])
def test_an_index_whose_weight_map_is_not_names_to_files_is_named(tiny_dir: Path, tmp_path: Path, weight_map,
                                                                   found) -> None:
    """Before: AttributeError "'list' object has no attribute 'items'" or a TypeError from Path / int."""
    d = _copy(tiny_dir, tmp_path / "index")
    (d / ckpt.INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json is not a valid index.*{found}"):
        load_llm(d)


def test_a_tensor_stored_as_integers_is_refused_not_loaded_as_nonsense(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "ints")
    shard = _rewrite(d, "model.norm.weight", torch.ones(64, dtype=torch.int32))
    with pytest.raises(CheckpointError, match=f"'model.norm.weight' in {shard} is stored as torch.int32"):
        load_llm(d)


def test_a_missing_tensor_says_where_it_was_looked_for_and_what_to_fix(tiny_dir: Path, tmp_path: Path) -> None:
    """A config.json with one layer more than the shards hold: the message named only the tensor, not that the
    index lists it nowhere nor that config.json may describe another model."""
    d = _copy(tiny_dir, tmp_path / "more-layers")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\..*' \(shape .*\) is missing from the LLM checkpoint "
                                              r"in .*: model\.safetensors\.index\.json lists it in no shard.*download it "
                                              r"again.*num_hidden_layers"):
        load_llm(d)


def test_fp8_scales_of_another_block_size_than_the_config_says_point_at_weight_block_size(tiny_fp8_dir: Path,
                                                                                         tmp_path: Path) -> None:
    d = _copy(tiny_fp8_dir, tmp_path / "block")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [16, 16]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"weight_scale_inv' in .*: expected shape \[\d+, \d+\], found \[1, 1\]: "
                                              r"config.json's quantization_config.weight_block_size"):
        load_llm(d)


def test_a_model_path_without_config_json_says_where_the_checkpoint_is(tiny_dir: Path, tmp_path: Path) -> None:
    """A Hugging Face cache folder (models--org--name/) holds the checkpoint in snapshots/<revision>/; a volume
    that is not mounted leaves no folder at all. Both were "config.json not found: is ... a checkpoint directory?"."""
    from dotsvlm_serving.model.config import load_config

    cache = tmp_path / "models--rednote-hilab--dots.vlm1"
    snapshot = cache / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_dir / "config.json", snapshot / "config.json")
    with pytest.raises(FileNotFoundError, match=f"it is in {snapshot}: give that directory as the model path"):
        load_config(cache)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'gone'} does not exist: check the model path.*mounted"):
        load_config(tmp_path / "gone")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config.json not found: is .*empty a dots.vlm1 checkpoint directory\?$"):
        load_config(tmp_path / "empty")


def test_a_checkpoint_without_any_vision_tensor_is_called_another_model_not_a_partial_download(
        tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "llm-only")
    idx = json.loads((d / ckpt.INDEX_NAME).read_text())
    idx["weight_map"] = {k: f for k, f in idx["weight_map"].items() if not k.startswith("vision_tower.")}
    (d / ckpt.INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"has no vision_tower\.\* tensors at all: it is not a dots\.vlm1 checkpoint"):
        load_vision_tower(d)
    load_llm(d)  # the language model in it still loads
