"""What the transformers engine's text path costs per generated token, by the answer's length (CPU).

Feeds an answer's tokens one by one to the engine's own per-token code (`Engine._on_token`: detokenize,
stop-string search and holdback, the token event), without the model: the figure is the engine's added
cost per token, which the decode step pays on top of the forward. The engine decoded all of a request's
tokens at every step (quadratic per request); it now decodes a short window (`engine/detokenizer.py`).
The answer is the tiny checkpoint's tokenizer (byte-level BPE, as DeepSeek-V3's) on English text with
multi-byte characters; one stop string is set, as chat clients often do.

`--before REV` measures git revision REV's serving code (its `serving/` first on PYTHONPATH, in a
separate process) and this checkout's in one invocation, so the ratio compares the two on the same load.

    .venv/bin/python bench/detokenize.py [--lengths 1000 4000] [--reps 3] [--before REV] [--out bench/results/detokenize]
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import time

from bench_serving import before_and_after, bench_environment, run_child, write_results

TEXT = ("The lighthouse keeper wrote in his log: the sea was calm, the wind from the north-east, 12 knots. "
        "Café au lait at dawn; naïve gulls; 中文的灯塔 and a 🙂 for the children. ")
STOP = ("\n\nUser:",)
NOTES = """
Reading it: "last 100" (the median of those tokens' times) is what one more token costs once the answer is that long (the old engine's
grows with the answer: it decoded all tokens at every step; the new one's stays flat); "whole" is the
mean over the answer, first tokens (warm-up) included. Not counted: the forward (tens of ms a step on a
GPU for the real model) and the one full decode at the request's finish (the old engine paid it too).
The machine has 2 CPUs shared with other sessions, so single figures move by +-30%; the ratio's growth
with the answer's length is the point."""


def measure(lengths: list[int], reps: int) -> dict:
    """Microseconds per token for answers of each length: the mean over the whole answer, and the median
    over its last 100 tokens (what a step costs once the answer is that long)."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from dotsvlm_serving.engine import engine as engine_mod
    from dotsvlm_serving.engine import EngineRequest, SamplingParams
    from dotsvlm_serving.model.tiny_tokenizer import build_tiny_tokenizer

    tok = PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer().tokenizer, clean_up_tokenization_spaces=False)

    def detokenize(ids: list[int]) -> str:  # as the engine factory's
        return tok.decode(ids, skip_special_tokens=True)

    kwargs = {}
    if "token_streams" in inspect.signature(engine_mod.Engine.__init__).parameters:
        from dotsvlm_serving.engine.detokenizer import decode_streams

        kwargs["token_streams"] = decode_streams(tok, detokenize)  # as the engine factory's
    eng = engine_mod.Engine(torch.nn.Linear(1, 1), detokenize, eos_token_ids=set(), max_running=1,
                            kv_cache_tokens=10**6, context_length=10**6, **kwargs)
    answer = tok.encode(TEXT * (1 + max(lengths) // 20), add_special_tokens=False)
    out: dict[str, dict] = {}
    for n in lengths:
        whole, last = [], []
        for _ in range(reps):
            req = EngineRequest("bench", torch.zeros(1, 1), SamplingParams(max_tokens=n + 1, stop=STOP))
            seq = engine_mod._Seq(req, None)
            if hasattr(eng, "token_streams"):
                seq.stream = eng.token_streams()
            events: list = []
            steps = []
            for t in answer[:n]:
                t0 = time.perf_counter()
                eng._on_token(seq, t, events)
                steps.append(time.perf_counter() - t0)
            text = "".join(ev.get("text", "") for ev in events)
            assert text == detokenize(answer[:n])[:len(text)] and len(text) > 0.9 * len(detokenize(answer[:n]))
            whole.append(sum(steps) / n * 1e6)
            last.append(statistics.median(steps[-100:]) * 1e6)  # the median: a load spike moves it less
        out[str(n)] = {"us_per_token": statistics.median(whole), "us_per_token_last_100": statistics.median(last)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--before", default=None, help="git revision to measure first, in the same run")
    ap.add_argument("--out", default="bench/results/detokenize")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.lengths, args.reps)))
        return
    bench_environment()
    child_args = ["--lengths", *map(str, args.lengths), "--reps", str(args.reps)]
    runs = before_and_after(args.before, lambda pp, _: run_child(__file__, child_args, pp, timeout_s=3600))
    cmd = "bench/detokenize.py " + " ".join(sys.argv[1:])
    lines = ["# The engine's text path per generated token (detokenize, stop strings, events), CPU", "",
             f"`.venv/bin/python {cmd}` on {platform.node()} ({platform.machine()}), median of {args.reps} runs; "
             "microseconds per token: the mean over the whole answer / the median of its last 100 tokens.", "",
             "| answer | " + " | ".join(f"{k} ({r['revision']}): whole / last 100" for k, r in runs.items())
             + (" | before / after, last 100 |" if "before" in runs else " |"),
             "|---|" + "---|" * (len(runs) + ("before" in runs))]
    for n in map(str, args.lengths):
        cells = [f"{r[n]['us_per_token']:.1f} / {r[n]['us_per_token_last_100']:.1f}" for r in runs.values()]
        if "before" in runs:
            cells.append(f"{runs['before'][n]['us_per_token_last_100'] / runs['after'][n]['us_per_token_last_100']:.0f}x")
        lines.append(f"| {n} tokens | " + " | ".join(cells) + " |")
    lines += NOTES.splitlines()
    write_results(args.out, {"command": cmd, "runs": runs}, lines)


if __name__ == "__main__":
    main()
