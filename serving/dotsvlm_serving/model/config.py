"""The checkpoint's configuration: config.json (flat DeepSeek-V3 keys + `vision_config` + token ids)
and preprocessor_config.json.

No torch import at module level: the serving ingress reads limits and token ids from here without
loading the model. `DotsVLMConfig.llm_config()` imports transformers lazily.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:  # pragma: no cover
    from transformers import DeepseekV3Config

# Engine defaults (SGLang's dots_vlm); the checkpoint's config.json wins when it has them.
DEFAULT_IMAGE_TOKEN_ID = 128815
DEFAULT_VIDEO_TOKEN_ID = 128836

# Keys of config.json that describe the wrapper model, not the DeepSeek-V3 language model.
_NON_LLM_KEYS = frozenset(
    {"vision_config", "image_token_id", "video_token_id", "architectures", "model_type", "auto_map",
     "quantization_config", "torch_dtype", "dtype", "transformers_version"}
)


class VisionConfig(BaseModel):
    """`vision_config` of the checkpoint (dots ViT). Defaults are the dots.vlm1 values; unknown keys are
    kept (extra="allow") so a newer checkpoint still loads and round-trips."""

    model_config = ConfigDict(extra="allow")

    model_type: str = "dots_vit"
    embed_dim: int = Field(1536, ge=1)
    hidden_size: int = Field(7168, ge=1, description="patch merger output width = LLM hidden size")
    intermediate_size: int = Field(4224, ge=1)
    num_hidden_layers: int = Field(42, ge=1)
    num_attention_heads: int = Field(12, ge=1)
    num_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 1
    spatial_merge_size: int = 2
    rms_norm_eps: float = 1e-5
    use_bias: bool = False
    post_norm: bool = True
    is_causal: bool = False
    rope_theta: float = 10000.0

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.embed_dim % self.num_attention_heads:
            raise ValueError(f"vision embed_dim {self.embed_dim} is not divisible by num_attention_heads {self.num_attention_heads}")
        if (self.embed_dim // self.num_attention_heads) % 4:
            raise ValueError("vision head_dim must be divisible by 4 (2D RoPE splits it into row and column halves)")
        if self.is_causal:
            raise ValueError("vision_config.is_causal=true is not supported (dots.vlm1's tower is bidirectional)")
        return self

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Values per input row: channels x temporal x patch x patch (588 for dots.vlm1)."""
        return self.num_channels * self.temporal_patch_size * self.patch_size * self.patch_size


class PreprocessConfig(BaseModel):
    """Image preprocessing values (Qwen2-VL-style processor); read from preprocessor_config.json."""

    model_config = ConfigDict(extra="ignore")

    min_pixels: int = Field(3136, ge=1)
    max_pixels: int = Field(11_289_600, ge=1)
    patch_size: int = 14
    temporal_patch_size: int = 1
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @model_validator(mode="after")
    def _check(self) -> "PreprocessConfig":
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")
        return self

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        """Accepts both the flat Qwen2-VL keys and the newer `size: {shortest_edge, longest_edge}` form."""
        d = dict(data)
        size = d.get("size") or {}
        if isinstance(size, dict):
            d.setdefault("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
            d.setdefault("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        return cls.model_validate({k: v for k, v in d.items() if v is not None})


class DotsVLMConfig(BaseModel):
    """The whole checkpoint configuration. `raw` is config.json verbatim (it is what gets saved back)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    preprocess: PreprocessConfig = PreprocessConfig()
    raw: dict[str, Any]
    source: str = "config.json"  # where `raw` came from, for error messages

    @classmethod
    def from_dict(cls, raw: dict[str, Any], preprocess: dict[str, Any] | None = None) -> "DotsVLMConfig":
        """Raises ValueError (one line, naming the key and what it holds) for a key of the wrong type."""
        try:
            vision = VisionConfig.model_validate(raw.get("vision_config") or {})
        except ValidationError as exc:
            raise ValueError(_validation_summary(exc, "vision_config")) from None
        _check_quantization(raw.get("quantization_config"))
        pre = PreprocessConfig.from_json_dict(preprocess) if preprocess else PreprocessConfig(
            patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size)
        if pre.patch_size != vision.patch_size or pre.merge_size != vision.spatial_merge_size:
            raise ValueError(
                f"preprocessor_config.json (patch_size {pre.patch_size}, merge_size {pre.merge_size}) disagrees with "
                f"config.json vision_config (patch_size {vision.patch_size}, spatial_merge_size {vision.spatial_merge_size})")
        return cls(
            vision=vision,
            image_token_id=_token_id(raw, "image_token_id", DEFAULT_IMAGE_TOKEN_ID),
            video_token_id=_token_id(raw, "video_token_id", DEFAULT_VIDEO_TOKEN_ID),
            preprocess=pre,
            raw=raw,
        )

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return self.raw.get("quantization_config")

    def llm_kwargs(self) -> dict[str, Any]:
        """The flat DeepSeek-V3 keys of config.json (everything that is not the wrapper's), copied: transformers'
        config rewrites the rope_scaling dict it is given, and `raw` is what gets saved back."""
        return copy.deepcopy({k: v for k, v in self.raw.items() if k not in _NON_LLM_KEYS})

    def llm_config(self) -> "DeepseekV3Config":
        """A transformers DeepseekV3Config from the flat keys. `rope_scaling` (the checkpoint's legacy
        form, e.g. YaRN) is converted by transformers itself into `rope_parameters`."""
        from transformers import DeepseekV3Config

        kw = self.llm_kwargs()
        # transformers implements DeepSeek-V3's router only: sigmoid scores, noaux_tc group top-k.
        if kw.get("scoring_func", "sigmoid") != "sigmoid" or kw.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"unsupported MoE router (scoring_func={kw.get('scoring_func')!r}, topk_method={kw.get('topk_method')!r}): "
                             "the DeepSeek-V3 implementation needs scoring_func='sigmoid' and topk_method='noaux_tc'")
        try:
            cfg = DeepseekV3Config(**kw)
        except Exception as exc:  # transformers' strict fields (a huggingface_hub error, not a TypeError): a wrong type
            # (its message is several lines; Serve's status and `dotsvlm serve` show an error's last one)
            raise ValueError(f"a language-model key of {self.source} has the wrong type or value: "
                             f"{' '.join(str(exc).split())}: fix that key") from None
        if cfg.hidden_size != self.vision.hidden_size:
            raise ValueError(
                f"{self.source}: vision_config.hidden_size ({self.vision.hidden_size}) must equal the LLM hidden_size "
                f"({cfg.hidden_size}{'' if 'hidden_size' in kw else ', the default: the key is missing'}): the patch "
                "merger writes into the LLM's input embeddings")
        cfg._attn_implementation = "sdpa"
        return cfg


def load_config(model_dir: str | Path) -> DotsVLMConfig:
    """Read config.json (and preprocessor_config.json when present) from a checkpoint directory.

    A key of the wrong type is a ValueError that names the file and the key, on one line (Serve's status and
    `dotsvlm serve` show only an error's last line), not a bare `int()` or pydantic error."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(_no_config(d))
    raw = _read_json(cfg_path)
    pre_path = d / "preprocessor_config.json"
    pre = _read_json(pre_path) if pre_path.is_file() else None
    if pre is not None:
        try:
            PreprocessConfig.from_json_dict(pre)
        except ValidationError as exc:
            raise ValueError(f"{pre_path}: {_validation_summary(exc, '')}: fix or download it again") from None
    try:
        cfg = DotsVLMConfig.from_dict(raw, pre)
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: {exc}") from None
    return cfg.model_copy(update={"source": str(cfg_path)})


def _no_config(d: Path) -> str:
    """Why `d` has no config.json, and what to set model.path to instead (a Hugging Face cache folder holds the
    checkpoint two levels down, in snapshots/<revision>/; a volume that is not mounted shows as no folder)."""
    if not d.exists():
        return (f"{d} does not exist: check the model path (model.path; `dotsvlm serve --model`), and that the "
                f"volume holding the checkpoint is mounted there (model.volume, model.mountPath)")
    if not d.is_dir():
        return f"{d} is a file, not a checkpoint directory: give the directory that holds config.json as the model path"
    found = sorted(str(p.parent) for p in (*d.glob("*/config.json"), *d.glob("*/*/config.json")))
    hint = f"; it is in {found[0]}: give that directory as the model path" if len(found) == 1 else (
        f"; directories below it that have one: {', '.join(found[:3])}" if found else "")
    return f"{d / 'config.json'} not found: is {d} a dots.vlm1 checkpoint directory?{hint}"


def _validation_summary(exc: ValidationError, prefix: str) -> str:
    """A pydantic error as one line: each wrong key's dotted path, what is wrong, and the value found."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
        found = "" if err["type"].startswith("value_error") else f" (found {err.get('input')!r})"
        parts.append(f"{loc or prefix or '(top level)'}: {err['msg']}{found}")
    return "; ".join(parts)


def _token_id(raw: dict[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"'{key}' must be a non-negative integer token id (found {value!r}): fix the key, or remove "
                         f"it to use the default {default}")
    return value


def _check_quantization(qc: Any) -> None:
    """`quantization_config` as the FP8 loader reads it (`weight_block_size`: two positive integers)."""
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise ValueError(f"'quantization_config' must be an object, e.g. {{\"quant_method\": \"fp8\", "
                         f"\"weight_block_size\": [128, 128]}} (found {qc!r})")
    block = qc.get("weight_block_size")
    if block is None:
        return
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"'quantization_config.weight_block_size' must be two positive integers, e.g. [128, 128] "
                         f"(found {block!r})")


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): fix or download it again") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return raw
