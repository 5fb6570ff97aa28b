"""The per-stage cost model, every number with where it comes from.

`SOURCES` is written into the results so a reader sees which figures were measured here (CPU only: no
GPU figure of ours exists yet), which come from published H100 figures, and which are assumptions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dotsvlm_serving.model.config import VisionConfig  # no torch: the real tower's shape

MEASURED = "measured here (CPU)"
PUBLISHED = "published"
DERIVED = "derived"
ASSUMED = "assumed"


def tower_flops_per_image(pixels: float, cfg: VisionConfig = VisionConfig()) -> float:
    """Forward FLOPs of the dots ViT for one image: the same count as `bench/vision_throughput.py`'s
    `tower_flops` (patch embed, blocks with block-diagonal attention, merger; multiply-add = 2)."""
    d, i, h = cfg.embed_dim, cfg.intermediate_size, cfg.hidden_size
    m = cfg.spatial_merge_size ** 2
    n = pixels / cfg.patch_size ** 2
    patch_dim = cfg.num_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    per_block = 2 * n * (3 * d * d + d * d + 3 * d * i) + 4 * n * n * d
    return 2 * n * patch_dim * d + cfg.num_hidden_layers * per_block + 2 * (n / m) * (m * d * m * d + m * d * h)


@dataclass(frozen=True)
class CostModel:
    # Vision pool: one replica = one GPU running the 1.3B-parameter dots ViT in bf16.
    vision_gpus_per_replica: int = 1
    gpu_bf16_flops: float = 989e12
    vision_mfu: float = 0.40
    vision_call_overhead_s: float = 0.010
    vision_max_ongoing: int = 256  # VisionEncoderDeployment's max_ongoing_requests
    vision_start_s: float = 30.0
    # LLM pool: one replica = DeepSeek-V3 FP8, TP16 over 2 nodes of 8 H100.
    llm_gpus_per_replica: int = 16
    decode_step_base_s: float = 0.0231
    decode_step_per_request_s: float = 0.00036
    prefill_tokens_per_s: float = 96_000.0
    prefill_share_of_step: float = 0.5  # chunked prefill: at most this share of the time while others decode
    max_running: int = 64  # CRD default llm.maxRunningRequests
    kv_tokens: int = 6_000_000
    llm_start_s: float = 300.0
    # The disaggregated path's own costs (vision hop, tensor queue, relays).
    hop_overhead_s: float = 0.099
    queue_transfer_s_per_mp: float = 0.018
    queue_max_items: int = 256  # contract default queue.max_items
    enqueue_timeout_s: float = 30.0  # contract default queue.enqueue_timeout_s
    # Co-located replica: the tower runs inside the LLM replica, between engine steps.
    colocated_vision_gpu_equiv: float = 8.0

    def encode_seconds(self, image_pixels: tuple[int, ...]) -> float:
        """Busy time of one vision replica for these images (batched: the per-call overhead is shared by
        the images of one request; requests of one batch are not charged it twice)."""
        flops = sum(tower_flops_per_image(p) for p in image_pixels)
        return flops / (self.gpu_bf16_flops * self.vision_mfu) + self.vision_call_overhead_s

    def decode_step_s(self, batch: int) -> float:
        return self.decode_step_base_s + self.decode_step_per_request_s * max(batch - 1, 0)

    def prefill_s(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s

    def path_overhead_s(self, pixels: int) -> float:
        """Added to the TTFT of every request on the disaggregated path (not on the co-located one)."""
        return self.hop_overhead_s + self.queue_transfer_s_per_mp * pixels / 1e6

    def to_json(self) -> dict:
        return asdict(self)


SOURCES: list[dict] = [
    {"figure": "vision encode time per image", "value": "tower FLOPs(pixels) / (989 TFLOP/s x 0.40)",
     "kind": DERIVED,
     "source": "FLOP count of the real tower config (42 blocks, 1536 wide, block-diagonal attention; same formula as "
               "bench/vision_throughput.py); H100 SXM bf16 dense peak 989 TFLOP/s (NVIDIA datasheet); MFU 0.40 "
               "assumed (no GPU run of bench/vision_throughput.py yet: replace with its measured MFU)"},
    {"figure": "vision per-request call overhead", "value": "10 ms", "kind": ASSUMED, "source": "batching wait + transfer"},
    {"figure": "packing (batching) speed-up of the tower", "value": "not modelled beyond shared overhead", "kind": MEASURED,
     "source": "bench/results/vision_README.md: 1.05x at ~1 MP per image, 2.36x for 0.05 MP images (CPU, reduced width); "
               "the traces' images are 0.1-4 MP, where packing gains little"},
    {"figure": "vision replica start-up", "value": "30 s", "kind": ASSUMED,
     "source": "pod on an existing GPU node: image cached, 2.6 GB of tower weights, CUDA init"},
    {"figure": "LLM decode step at batch 1", "value": "23.1 ms", "kind": PUBLISHED,
     "source": "DeepSeek-R1-0528 (DeepSeek-V3 architecture), SGLang TP16 on 16 H100 over InfiniBand, TPOT at "
               "concurrency 1: tenstorrent/tt-inference-server issue #356 (2025-07-09)"},
    {"figure": "LLM decode step growth per running request", "value": "0.36 ms", "kind": PUBLISHED,
     "source": "slope of TPOT 17.2 ms (conc 16) -> 34.6 ms (conc 64), DeepSeek-R1 FP8 SGLang TP8 H200: "
               "SemiAnalysisAI/InferenceX issue #870; assumed to carry over to TP16 H100"},
    {"figure": "LLM prefill throughput", "value": "96k tokens/s per replica", "kind": PUBLISHED,
     "source": "TTFT 179.7 ms at 128 input tokens vs 263.9 ms at 8192 (same 16 H100 sweep, issue #356): "
               "10.4 us per extra prompt token"},
    {"figure": "LLM max running requests", "value": "64", "kind": ASSUMED, "source": "the CRD default llm.maxRunningRequests"},
    {"figure": "LLM KV budget", "value": "6M tokens", "kind": DERIVED,
     "source": "16 x 80 GB x 0.9 - ~690 GB FP8 weights, MLA cache 61 x 576 x 2 B per token; never binding in these traces"},
    {"figure": "LLM replica start-up (2 nodes)", "value": "300 s", "kind": ASSUMED,
     "source": "~690 GB of FP8 weights from node-local disk, NCCL over 2 nodes, CUDA graph capture"},
    {"figure": "disaggregated path overhead per request", "value": "99 ms", "kind": MEASURED,
     "source": "bench/results/disagg_overhead.md: text-only request, disaggregated minus single-process (CPU, tiny model)"},
    {"figure": "tensor-queue transfer per MP of image", "value": "18 ms", "kind": MEASURED,
     "source": "bench/results/queue_throughput.md: put 13.5 ms + fetch 4.6 ms per 18 MB item (= the embeddings of "
               "~1 MP: 1275 tokens x 7168 x 2 B), host path on CPU"},
    {"figure": "tensor queue: 256 items, 30 s enqueue timeout then 429", "value": "", "kind": ASSUMED,
     "source": "the serve contract's defaults (QueueConfig)"},
    {"figure": "co-located replica's tower speed", "value": "8 GPUs' worth, stalls the engine", "kind": ASSUMED,
     "source": "tower run between engine steps on the replica's GPUs (vLLM-style), tensor-parallel inside one node"},
    {"figure": "GPU-hours", "value": "vision replica 1 GPU, LLM and co-located replica 16 GPUs", "kind": ASSUMED,
     "source": "counted from the moment a replica is asked for until it has drained and left (start-up included)"},
]
