"""Loading and saving Hugging Face-style checkpoint directories (sharded safetensors + index).

A vision replica reads only `vision_tower.*` tensors and an LLM replica only the rest: the index tells
which shard holds which tensor, shards are memory-mapped with `safe_open`, and each tensor is copied
straight into a parameter allocated once on the target device (the model is built on the meta device
first), so the whole checkpoint is never in memory. FP8 block-quantized weights are dequantized on load.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import fp8
from .config import DotsVLMConfig, load_config
from .vision import DotsVisionTower

VISION_PREFIX = "vision_tower."
INDEX_NAME = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model; the message names the tensor, shapes and file."""


# ---------------------------------------------------------------------------------------------- reading

def weight_map(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index when present, else from every *.safetensors file."""
    d = Path(model_dir)
    index = d / INDEX_NAME
    if index.is_file():
        try:
            wm = json.loads(index.read_text()).get("weight_map") or {}
        except (ValueError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a valid index ({type(exc).__name__}: {exc}): download it "
                                  f"again") from exc
        if not isinstance(wm, dict) or not all(isinstance(v, str) and v for v in wm.values()):
            bad = next((f"'{k}': {v!r}" for k, v in wm.items() if not (isinstance(v, str) and v)), None) \
                if isinstance(wm, dict) else f"a {type(wm).__name__}"
            raise CheckpointError(f"{index} is not a valid index: its weight_map must map each tensor name to a "
                                  f"shard file name (found {bad}): download it again")
        out = {k: d / v for k, v in wm.items()}
        for f in sorted(set(out.values())):
            if not f.is_file():
                raise CheckpointError(f"{index} lists shard {f.name}, which is missing from {d}")
        return out
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files and no {INDEX_NAME} in {d}")
    out = {}
    for f in files:
        with _opened(f) as h:
            for k in h.keys():
                out[k] = f
    return out


@contextlib.contextmanager
def _opened(f: Path) -> Any:
    """A shard's handle; a shard that cannot be read (a partial download) is named, among ~150."""
    try:
        handle = safe_open(str(f), framework="pt", device="cpu")
    except SafetensorError as exc:
        if _is_lfs_pointer(f):
            raise CheckpointError(f"shard {f} is a Git LFS pointer, not the weights: the checkpoint was cloned "
                                  f"without Git LFS; run `git lfs install && git lfs pull` in {f.parent}, or "
                                  f"download it with `huggingface-cli download`") from exc
        raise CheckpointError(f"shard {f} cannot be read ({exc}): it is most likely incomplete; download it "
                              f"again") from exc
    except OSError as exc:
        raise _io_error(f"shard {f}", exc) from exc
    with handle as h:
        yield h


class _Shards:
    """Lazily opened, memory-mapped shard handles, closed together."""

    def __init__(self, wm: dict[str, Path]) -> None:
        self.wm = wm
        self._stack = contextlib.ExitStack()
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> "_Shards":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def file(self, key: str) -> Path:
        return self.wm[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._read(key, lambda h: h.get_slice(key).get_shape()))

    def get(self, key: str) -> torch.Tensor:
        return self._read(key, lambda h: h.get_tensor(key))

    def _read(self, key: str, how: Any) -> Any:
        f = self.wm[key]
        if f not in self._open:
            self._open[f] = self._stack.enter_context(_opened(f))
        try:
            return how(self._open[f])
        except SafetensorError as exc:  # the index names a tensor the shard does not hold, or its bytes are cut
            raise CheckpointError(f"tensor '{key}' cannot be read from shard {f} ({exc}): the shard or "
                                  f"{INDEX_NAME} is incomplete or from another download") from exc
        except OSError as exc:  # the bytes are there but the volume failed: downloading again would not help
            raise _io_error(f"tensor '{key}' in shard {f}", exc) from exc


def _is_lfs_pointer(f: Path) -> bool:
    """A `git clone` without Git LFS leaves each shard as a ~130-byte text file naming the real one."""
    try:
        with open(f, "rb") as fh:
            return fh.read(64).startswith(b"version https://git-lfs.github.com/spec/")
    except OSError:
        return False


def _io_error(what: str, exc: OSError) -> CheckpointError:
    """An I/O failure is the volume's (a network mount, a permission), not the download's."""
    return CheckpointError(f"{what} cannot be read: {exc.strerror or exc} (OSError {exc.errno}); check the file's "
                           f"permissions and the volume it is on (a network mount that dropped, a full or failed "
                           f"disk)")


def _shape_error(key: str, expected: tuple[int, ...], found: tuple[int, ...], file: Path) -> CheckpointError:
    why = ("config.json's quantization_config.weight_block_size is not the block size of these FP8 scales"
           if key.endswith("_scale_inv") else
           "config.json (its sizes, e.g. hidden_size, vocab_size, vision_config) describes another model than this "
           "checkpoint's tensors")
    return CheckpointError(f"tensor '{key}' in {file.name}: expected shape {list(expected)}, found {list(found)}: {why}")


def _read(shards: _Shards, key: str, expected: tuple[int, ...], device: torch.device, block: tuple[int, int]) -> torch.Tensor:
    """One tensor, shape-checked, FP8 dequantized to float32 when it has a `weight_scale_inv`."""
    found = shards.shape(key)
    if found != tuple(expected):
        raise _shape_error(key, expected, found, shards.file(key))
    t = shards.get(key)
    if not (t.is_floating_point() or t.is_complex()):  # copied into a float parameter it would load, as nonsense
        raise CheckpointError(f"tensor '{key}' in {shards.file(key).name} is stored as {t.dtype}, not as floating "
                              f"point: the checkpoint is not a dots.vlm1 checkpoint or was converted wrongly")
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        skey = key[: -len("weight")] + "weight_scale_inv" if key.endswith("weight") else key + "_scale_inv"
        if skey not in shards.wm:
            raise CheckpointError(f"tensor '{key}' in {shards.file(key).name} is FP8 but its scale '{skey}' is missing")
        sexp = fp8.scale_shape(t.shape, block)
        sfound = shards.shape(skey)
        if sfound != sexp:
            raise _shape_error(skey, sexp, sfound, shards.file(skey))
        t = fp8.dequantize(t.to(device), shards.get(skey).to(device), block)
    return t


def _fill(model: torch.nn.Module, wm: dict[str, Path], mapping: Iterator[tuple[str, str, Any]], *, device: torch.device,
          block: tuple[int, int], what: str, model_dir: Path) -> None:
    """Copy checkpoint tensors into `model`'s (already allocated) parameters and buffers.

    `mapping` yields (checkpoint key, in-memory name, slice or None) for every tensor the model needs.
    """
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with _Shards(wm) as shards, torch.no_grad():
        for ckey, name, index in mapping:
            target = params[name] if index is None else params[name][index]
            if ckey not in wm:
                where = (f"{INDEX_NAME} lists it in no shard" if (model_dir / INDEX_NAME).is_file()
                         else "no *.safetensors file holds it")
                raise CheckpointError(f"tensor '{ckey}' (shape {list(target.shape)}) is missing from the {what} checkpoint "
                                      f"in {model_dir}: {where}; the download is incomplete (download it again), or "
                                      f"config.json describes another model than the tensors (compare its sizes, e.g. "
                                      f"num_hidden_layers, with the checkpoint's)")
            target.copy_(_read(shards, ckey, tuple(target.shape), device, block))


def _check_unexpected(keys: list[str], expected: set[str], what: str, wm: dict[str, Path]) -> None:
    extra = sorted(k for k in keys if k not in expected)
    if extra:
        shown = ", ".join(f"'{k}' ({wm[k].name})" for k in extra[:5])
        raise CheckpointError(f"{len(extra)} unexpected {what} tensor(s) in the checkpoint, e.g. {shown}: "
                              "the checkpoint does not match this model's architecture")


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate uninitialized storage on `device` for a meta-device model (filled by the loader)."""
    model.to_empty(device=device)


def load_vision_tower(model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      config: DotsVLMConfig | None = None) -> DotsVisionTower:
    """The vision tower from a checkpoint directory, reading only `vision_tower.*` tensors."""
    d = Path(model_dir)
    cfg = config or load_config(d)
    device = torch.device(device)
    with torch.device("meta"):
        tower = DotsVisionTower(cfg.vision)
    tower.to(dtype=dtype)
    _materialize(tower, device)
    wm = {k: f for k, f in weight_map(d).items() if k.startswith(VISION_PREFIX)}
    if not wm:  # (the first missing tensor alone would suggest a partial download)
        raise CheckpointError(f"the checkpoint in {d} has no {VISION_PREFIX}* tensors at all: it is not a dots.vlm1 "
                              f"checkpoint (a language model alone, e.g. DeepSeek-V3?); point the model path at a "
                              f"dots.vlm1 checkpoint")
    names = [n for n, _ in tower.named_parameters()]
    _check_unexpected([k for k in wm if not k.endswith("_scale_inv")], {VISION_PREFIX + n for n in names}, "vision", wm)
    _fill(tower, wm, ((VISION_PREFIX + n, n, None) for n in names), device=device,
          block=fp8.block_size(cfg.quantization_config), what="vision", model_dir=d)
    return tower.eval()


def _llm_mapping(model: torch.nn.Module) -> tuple[list[tuple[str, str, Any]], set[str]]:
    """(checkpoint key, in-memory name, index) for every LLM tensor, and the set of checkpoint keys."""
    out: list[tuple[str, str, Any]] = []
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        m = _FUSED_EXPERT_KEY.match(name)
        if m is None:
            out.append((name, name, None))
            continue
        prefix, kind = m.groups()
        n_exp = t.shape[0]
        if kind == "gate_up_proj":  # [E, 2I, H]: gate rows then up rows (transformers' fused layout)
            inter = t.shape[1] // 2
            for j in range(n_exp):
                out.append((f"{prefix}.{j}.gate_proj.weight", name, (j, slice(0, inter))))
                out.append((f"{prefix}.{j}.up_proj.weight", name, (j, slice(inter, 2 * inter))))
        else:  # down_proj [E, H, I]
            for j in range(n_exp):
                out.append((f"{prefix}.{j}.down_proj.weight", name, j))
    return out, {c for c, _, _ in out}


def _ignored_llm_key(key: str, n_layers: int) -> bool:
    """Multi-token-prediction layers (index >= num_hidden_layers) and stored rotary tables are not used."""
    m = _LAYER_KEY.match(key)
    return (m is not None and int(m.group(1)) >= n_layers) or key.endswith("rotary_emb.inv_freq") or key.endswith("_scale_inv")


def load_llm(model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             config: DotsVLMConfig | None = None):
    """transformers' DeepseekV3ForCausalLM from every non-vision tensor of the checkpoint.

    Per-expert checkpoint keys are written into transformers' fused expert tensors; FP8 weights are
    dequantized to `dtype`; multi-token-prediction layers are skipped.
    """
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    from .llm import build_llm

    d = Path(model_dir)
    cfg = config or load_config(d)
    device = torch.device(device)
    model = build_llm(cfg, device="meta", dtype=dtype)
    _materialize(model, device)
    with torch.device(device):  # non-persistent buffers are not in the checkpoint: recompute them
        model.model.rotary_emb = DeepseekV3RotaryEmbedding(config=model.config)
    n_layers = model.config.num_hidden_layers
    wm = {k: f for k, f in weight_map(d).items() if not k.startswith(VISION_PREFIX)}
    mapping, expected = _llm_mapping(model)
    _check_unexpected([k for k in wm if not _ignored_llm_key(k, n_layers)], expected, "LLM", wm)
    _fill(model, wm, iter(mapping), device=device, block=fp8.block_size(cfg.quantization_config), what="LLM", model_dir=d)
    return model.eval()


# ---------------------------------------------------------------------------------------------- writing

def llm_state_to_checkpoint(llm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory (fused experts) names -> the checkpoint's per-expert keys; other keys unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, t in llm_state.items():
        m = _FUSED_EXPERT_KEY.match(name)
        if m is None:
            out[name] = t
            continue
        prefix, kind = m.groups()
        if kind == "gate_up_proj":
            inter = t.shape[1] // 2
            for j in range(t.shape[0]):
                out[f"{prefix}.{j}.gate_proj.weight"] = t[j, :inter]
                out[f"{prefix}.{j}.up_proj.weight"] = t[j, inter:]
        else:
            for j in range(t.shape[0]):
                out[f"{prefix}.{j}.down_proj.weight"] = t[j]
    return out


def _natural_key(k: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", k)]


def save_checkpoint(model_dir: str | Path, *, vision_state: dict[str, torch.Tensor], llm_state: dict[str, torch.Tensor],
                    config: dict[str, Any], shard_max_bytes: int = 5 * 1024**3, fp8_weights: bool = False) -> Path:
    """Write config.json, sharded safetensors and model.safetensors.index.json.

    `vision_state` has the tower's names (the `vision_tower.` prefix is added); `llm_state` may use
    transformers' in-memory names (fused experts) or checkpoint names. Vision tensors get their own
    shards so a vision replica opens only those. With `fp8_weights`, LLM linear weights are stored as
    FP8 e4m3 with 128x128 `weight_scale_inv` and config.json gets a `quantization_config`.
    """
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    groups: list[dict[str, torch.Tensor]] = [
        {VISION_PREFIX + k: v for k, v in sorted(vision_state.items(), key=lambda kv: _natural_key(kv[0]))}, {}]
    for k, v in sorted(llm_state_to_checkpoint(llm_state).items(), key=lambda kv: _natural_key(kv[0])):
        if fp8_weights and fp8.is_fp8_candidate(k, tuple(v.shape)):
            q, s = fp8.quantize(v)
            groups[1][k] = q
            groups[1][k[: -len("weight")] + "weight_scale_inv"] = s
        else:
            groups[1][k] = v
    if fp8_weights:
        cfg["quantization_config"] = dict(fp8.QUANTIZATION_CONFIG)
    else:
        cfg.pop("quantization_config", None)

    shards: list[dict[str, torch.Tensor]] = []
    for group in groups:
        cur: dict[str, torch.Tensor] = {}
        size = 0
        for k, v in group.items():
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > shard_max_bytes:
                shards.append(cur)
                cur, size = {}, 0
            # clone: safetensors refuses tensors that share storage (e.g. slices of a fused expert tensor)
            cur[k] = v.detach().to("cpu").contiguous().clone()
            size += nbytes
        if cur:
            shards.append(cur)

    for old in d.glob("model*.safetensors"):
        old.unlink()
    total = len(shards)
    wmap: dict[str, str] = {}
    total_size = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{total:05d}.safetensors"
        save_file(shard, str(d / name), metadata={"format": "pt"})
        for k, v in shard.items():
            wmap[k] = name
            total_size += v.numel() * v.element_size()
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": wmap}, indent=2) + "\n")
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return d


def checkpoint_tensor_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, reading only headers (for tools and tests)."""
    wm = weight_map(model_dir)
    by_file: dict[Path, list[str]] = defaultdict(list)
    for k, f in wm.items():
        by_file[f].append(k)
    out = {}
    for f, keys in by_file.items():
        with safe_open(str(f), framework="pt", device="cpu") as h:
            for k in keys:
                out[k] = tuple(h.get_slice(k).get_shape())
    return out
