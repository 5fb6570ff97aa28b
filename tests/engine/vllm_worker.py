"""Runs the vllm engine on a checkpoint inside the vLLM environment (.venv-vllm) for tests/engine/test_vllm_engine.py.

Reads a JSON job on stdin: {"model_path", "requests": [{"id", "ids", "image_embeds" (list of rows or
null), "max_tokens", "stop", "cancel_after_events"}]}; prints one JSON line: for each request its
streamed events, and the token ids vLLM generated for the same prompt (greedy, without stop strings).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def main() -> None:
    import numpy as np

    from dotsvlm_serving.engine import EngineInput, SamplingParams
    from dotsvlm_serving.engine.vllm_engine import VLLMEngine
    from dotsvlm_serving.serve_config import LLMPoolConfig, ServeAppConfig

    job = json.load(sys.stdin)
    cfg = ServeAppConfig(model_path=job["model_path"], device="cpu", dtype="float32",
                         llm=LLMPoolConfig(engine="vllm", context_length=512, max_running_requests=4))
    t0 = time.monotonic()
    engine = VLLMEngine.from_config(cfg.served_model(), cfg.llm_server_config())
    startup = time.monotonic() - t0
    out: dict = {"startup_s": startup, "stats_keys": sorted(engine.stats()), "results": {}}
    try:
        reqs = job["requests"]
        for r in reqs:
            emb = None if r.get("image_embeds") is None else np.asarray(r["image_embeds"], dtype=np.float32)
            engine.add(EngineInput(r["id"], r["ids"], emb, SamplingParams(max_tokens=r["max_tokens"], temperature=0,
                                                                         stop=tuple(r.get("stop") or ()))))
            out["results"][r["id"]] = {"events": []}
        cancel_after = {r["id"]: r["cancel_after_events"] for r in reqs if r.get("cancel_after_events")}
        deadline = time.monotonic() + 300
        out["stats_busy"] = engine.stats()
        while engine.has_work() and time.monotonic() < deadline:
            for ev in await engine.step():
                evs = out["results"][ev["request_id"]]["events"]
                evs.append(ev)
                if len(evs) == cancel_after.get(ev["request_id"], -1):
                    engine.cancel(ev["request_id"])
        # The token ids for each prompt, straight from vLLM (greedy, no stop strings).
        for r in reqs:
            emb = None if r.get("image_embeds") is None else np.asarray(r["image_embeds"], dtype=np.float32)
            prompt = engine._prompt(EngineInput(r["id"], r["ids"], emb, SamplingParams(max_tokens=1)))
            sp = engine.sampling_params(SamplingParams(max_tokens=r["max_tokens"], temperature=0))
            from vllm.sampling_params import RequestOutputKind
            sp.output_kind = RequestOutputKind.FINAL_ONLY
            async for o in engine.llm.generate(prompt, sp, r["id"] + "-ids"):
                if o.finished:
                    out["results"][r["id"]]["token_ids"] = list(o.outputs[0].token_ids)
        out["stats_idle"] = engine.stats()
    finally:
        await engine.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
