"""The engine on a tiny DeepSeek-V3 (random weights): batched decoding with staggered joins equals
unbatched greedy decoding token for token; sampling parameters; stop strings; limits; cancellation."""

from __future__ import annotations

import codecs
import random

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache

from dotsvlm_serving.engine import (Engine, EngineInput, EngineLimitError, EngineRequest, RequestBudget,
                                    SamplingParams)
from dotsvlm_serving.engine.transformers_engine import TransformersEngine
from dotsvlm_serving.engine.sampling import StopTail, holdback, sample_token


@pytest.fixture(scope="module")
def llm() -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                           n_shared_experts=1, n_group=1, topk_group=1, num_attention_heads=4, num_key_value_heads=4,
                           q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                           max_position_embeddings=512, rope_scaling=None)
    return DeepseekV3ForCausalLM(cfg).eval()


def detok(ids: list[int]) -> str:
    return "".join(f"<{i}>" for i in ids)


@torch.inference_mode()
def greedy_alone(model: DeepseekV3ForCausalLM, embeds: torch.Tensor, n: int) -> list[int]:
    cache = DynamicCache(config=model.config)
    out = model(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True)
    toks = [int(out.logits[0, -1].argmax())]
    while len(toks) < n:
        out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True)
        toks.append(int(out.logits[0, -1].argmax()))
    return toks


def make_engine(model: DeepseekV3ForCausalLM, **kw) -> Engine:
    args = dict(eos_token_ids=set(), max_running=8, kv_cache_tokens=4096, context_length=256)
    args.update(kw)
    return Engine(model, detok, **args)


def run_all(engine: Engine, joins: dict[int, list[EngineRequest]], max_steps: int = 500) -> dict[str, dict]:
    """Step the engine, adding requests at given step numbers; collect text and finish events."""
    results: dict[str, dict] = {}
    step = 0
    while step < max_steps and (engine.has_work() or any(k >= step for k in joins)):
        for r in joins.get(step, []):
            engine.add(r)
        for ev in engine.step():
            res = results.setdefault(ev["request_id"], {"text": ""})
            res["text"] += ev.get("text", "")
            if ev["type"] in ("finish", "error"):
                res["final"] = ev
        step += 1
    return results


def test_batched_decode_with_joins_equals_unbatched_greedy(llm: DeepseekV3ForCausalLM) -> None:
    g = torch.Generator().manual_seed(1)
    lengths = [5, 17, 9, 30, 1, 12]
    embeds = [torch.randn(n, 64, generator=g) for n in lengths]
    max_new = [12, 7, 15, 10, 9, 11]
    expected = {f"r{i}": greedy_alone(llm, e, m) for i, (e, m) in enumerate(zip(embeds, max_new))}
    reqs = [EngineRequest(f"r{i}", e, SamplingParams(max_tokens=m, temperature=0))
            for i, (e, m) in enumerate(zip(embeds, max_new))]
    # Requests join between decode steps, while others are mid-generation, and leave at different times.
    results = run_all(make_engine(llm), {0: reqs[:2], 3: reqs[2:4], 4: [reqs[4]], 9: [reqs[5]]})
    for rid, toks in expected.items():
        assert results[rid]["text"] == detok(toks), rid
        assert results[rid]["final"]["finish_reason"] == "length"
        assert results[rid]["final"]["usage"]["completion_tokens"] == len(toks)


def test_running_limit_and_kv_budget(llm: DeepseekV3ForCausalLM) -> None:
    eng = make_engine(llm, max_running=2, kv_cache_tokens=100)
    assert eng.free_slots() == 2 and eng.free_tokens() == 100
    eng.add(EngineRequest("a", torch.zeros(10, 64), SamplingParams(max_tokens=20, temperature=0)))
    assert eng.free_slots() == 1 and eng.free_tokens() == 70
    with pytest.raises(EngineLimitError, match="maximum context length is 256"):
        eng.check_limits(250, 10)
    with pytest.raises(EngineLimitError, match="KV-cache"):
        make_engine(llm, kv_cache_tokens=50).add(EngineRequest("b", torch.zeros(40, 64), SamplingParams(max_tokens=20)))


def test_request_budget_is_what_every_engine_admits_by() -> None:
    """One home for both engines' admission (the vllm engine uses the same RequestBudget with vLLM's KV size)."""
    budget = RequestBudget(context_length=256, kv_tokens=100, max_running=2)
    assert budget.free_slots(1) == 1 and budget.free_slots(3) == 0
    assert budget.free_tokens(30) == 70 and budget.free_tokens(130) == 0
    budget.check(60, 40)  # exactly the KV budget fits
    with pytest.raises(EngineLimitError, match=r"needs 260 \(250 in the messages, 10 for the completion\)"):
        budget.check(250, 10)
    with pytest.raises(EngineLimitError, match="needs 101 KV-cache tokens but a replica has only 100; lower max_tokens"):
        budget.check(61, 40)
    assert EngineInput("r", [1, 2, 3], None, SamplingParams(max_tokens=5)).reserved_tokens == 8


def test_eos_stop_string_and_cancellation(llm: DeepseekV3ForCausalLM) -> None:
    e = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    toks = greedy_alone(llm, e, 6)
    eng = make_engine(llm, eos_token_ids={toks[2]} - set(toks[:2]))
    res = run_all(eng, {0: [EngineRequest("eos", e, SamplingParams(max_tokens=6, temperature=0))]})
    if toks[2] not in toks[:2]:
        assert res["eos"]["final"]["finish_reason"] == "stop" and res["eos"]["text"] == detok(toks[:2])
    stop = f"<{toks[3]}>"
    res = run_all(make_engine(llm), {0: [EngineRequest("s", e, SamplingParams(max_tokens=6, temperature=0, stop=(stop,)))]})
    first = detok(toks).find(stop)
    assert res["s"]["final"]["finish_reason"] == "stop" and res["s"]["text"] == detok(toks)[:first]
    assert stop not in res["s"]["text"]
    eng = make_engine(llm)
    eng.add(EngineRequest("c", e, SamplingParams(max_tokens=50, temperature=0)))
    eng.add(EngineRequest("d", e, SamplingParams(max_tokens=5, temperature=0)))
    eng.step()
    eng.cancel("c")
    evs = eng.step()
    assert {"request_id": "c", "type": "finish"}.items() <= next(x for x in evs if x["request_id"] == "c").items()
    assert next(x for x in evs if x["request_id"] == "c")["finish_reason"] == "cancelled"
    assert eng.num_running() == 1
    res = run_all(eng, {})
    assert res["d"]["final"]["finish_reason"] == "length"


def test_a_cancel_for_a_request_the_engine_does_not_hold_does_not_cancel_a_later_one_of_that_id(
        llm: DeepseekV3ForCausalLM) -> None:
    """The replica cancels requests that have already finished (the queue's "stop these" for a finished one,
    a rejoin). On an idle engine that cancel waited for the next step, and the next delivery of that request
    to the replica ended at once as "cancelled"."""
    e = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    eng = make_engine(llm)
    res = run_all(eng, {0: [EngineRequest("r", e, SamplingParams(max_tokens=3, temperature=0))]})
    assert res["r"]["final"]["finish_reason"] == "length" and not eng.has_work()
    eng.cancel("r")  # finished: nothing to stop
    eng.cancel("never-added")
    res = run_all(eng, {0: [EngineRequest("r", e, SamplingParams(max_tokens=3, temperature=0))]})
    assert res["r"]["final"]["finish_reason"] == "length" and res["r"]["text"] == detok(greedy_alone(llm, e, 3))


def test_the_vllm_engine_also_ignores_a_cancel_for_a_request_it_does_not_hold() -> None:
    """The same for the vllm engine's bookkeeping (vLLM itself replaced by a stand-in that finishes each
    request with one token)."""
    import asyncio
    import threading
    from collections import deque
    from types import SimpleNamespace

    from dotsvlm_serving.engine.vllm_engine import VLLMEngine

    class _LLM:
        async def generate(self, prompt, params, rid):
            yield SimpleNamespace(finished=True, outputs=[SimpleNamespace(token_ids=[7], text="hi",
                                                                          finish_reason="length", stop_reason=None)])

        async def abort(self, rid):
            pass

    eng = VLLMEngine.__new__(VLLMEngine)  # no vLLM here: only the engine's own bookkeeping runs
    eng.llm, eng._lock, eng._incoming, eng._cancel, eng._reqs, eng._events = _LLM(), threading.Lock(), deque(), set(), {}, []
    eng._wake, eng.tokens_generated, eng.image_token_id = None, 0, 200
    eng.budget = RequestBudget(context_length=256, kv_tokens=4096, max_running=4)
    eng.sampling_params = lambda p: None

    async def run() -> list:
        eng.cancel("r")  # not held: nothing to stop
        eng.add(EngineInput("r", [5, 9], None, SamplingParams(max_tokens=1)))
        events: list = []
        while eng.has_work():
            events += await eng.step()
        return events

    final = [ev for ev in asyncio.run(run()) if ev["type"] == "finish"]
    assert [(ev["request_id"], ev["finish_reason"], ev["text"]) for ev in final] == [("r", "length", "hi")]


def test_sampling_seed_top_k_top_p() -> None:
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0, 1.0])
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=7)
    a = [sample_token(logits, p, g) for g in [p.make_generator()] for _ in range(20)]
    b = [sample_token(logits, p, g) for g in [p.make_generator()] for _ in range(20)]
    assert a == b  # same seed, same draws
    k1 = SamplingParams(max_tokens=1, temperature=1.0, top_k=1, seed=1)
    assert {sample_token(logits, k1, k1.make_generator()) for _ in range(20)} == {1}
    tp = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=1)
    g = tp.make_generator()
    assert {sample_token(logits, tp, g) for _ in range(50)} <= {1, 2}
    assert sample_token(logits, SamplingParams(max_tokens=1, temperature=0), None) == 1
    # A temperature too small to divide by (the logits would overflow to inf) samples greedily, not a 500.
    tiny = SamplingParams(max_tokens=1, temperature=1e-40, seed=3)
    assert {sample_token(logits * 1e3, tiny, tiny.make_generator()) for _ in range(5)} == {1}


def test_holdback_for_partial_stop_strings() -> None:
    assert holdback("hello wor", ("world",)) == 3
    assert holdback("hello", ("xyz",)) == 0
    assert holdback("abc\ufffd", ()) == 1


def _holdback_by_definition(text: str, stops: tuple[str, ...]) -> int:
    """The longest end of text that is a proper beginning of a stop string, or the trailing U+FFFD run (a
    partial character) plus the longest such end of the text before it."""
    def longest(t: str) -> int:
        return max([k for s in stops for k in range(1, min(len(s) - 1, len(t)) + 1) if t.endswith(s[:k])], default=0)

    whole = text.rstrip("\ufffd")
    return max(longest(text), len(text) - len(whole) + longest(whole))


def test_stop_tail_holds_back_what_the_definition_says_as_the_text_grows_and_is_rewritten() -> None:
    """The per-request, incremental holdback withholds exactly the same characters as the definition, also
    when the detokenizer rewrites earlier characters (a U+FFFD that became a whole character)."""
    rnd = random.Random(1)
    for trial in range(1500):
        alpha = "ab\ufffd" if trial % 2 else "abc"
        stops = tuple("".join(rnd.choice(alpha) for _ in range(rnd.randint(0, 7))) for _ in range(rnd.randint(0, 3)))
        tail, text = StopTail(stops), ""
        for _ in range(25):
            cut = len(text) if rnd.random() < 0.7 else rnd.randint(max(0, len(text) - 4) if rnd.random() < 0.8 else 0,
                                                                   len(text))
            text = text[:cut] + "".join(rnd.choice(alpha) for _ in range(rnd.randint(0, 4)))
            assert tail.holdback(text) == holdback(text, stops) == _holdback_by_definition(text, stops), (stops, text)


def test_a_long_stop_string_costs_each_token_only_its_new_characters() -> None:
    """One request with a 16k-character stop string stalled the whole batch: every token's holdback tried
    every length up to the stop string's (quadratic). Now each character of the text is fed once."""
    stop = "ab" * 8000 + "!"
    tail, text = StopTail((stop,)), ""
    for i in range(3000):  # one character a token, then the end rewritten as a detokenizer does
        text = text[:-1] + "ab"[(i - 1) % 2] + "ab"[i % 2] if i and i % 100 == 0 else text + "ab"[i % 2]
        held = tail.holdback(text)
        if i % 500 == 0:
            assert held == _holdback_by_definition(text, (stop,))
    assert held == len(text) if len(text) % 2 == 0 else held == len(text) - 1
    assert tail.steps <= len(text) + 2 * (3000 // 100)  # each token: its new characters and the rewritten one


def test_a_request_without_stop_strings_pays_nothing_per_token_for_them(monkeypatch) -> None:
    """Most requests set no stop string; their holdback compared the whole answer with the text before at
    every token (a pass over the answer per token, quadratic per request). Now they skip the matcher and
    hold back what they did: a partial character (U+FFFD) at the end, nothing else."""
    from dotsvlm_serving.engine import sampling

    calls = []
    real = sampling._common_prefix_len
    monkeypatch.setattr(sampling, "_common_prefix_len", lambda a, b: calls.append(1) or real(a, b))
    tail, text = StopTail(()), ""
    for i in range(2000):
        text += "ab\ufffd"[i % 3]
        assert tail.holdback(text) == _holdback_by_definition(text, ())
    assert StopTail(("",)).holdback("x\ufffd\ufffd") == 2  # (an empty stop string is no stop string)
    assert calls == [] and tail.steps == 0
    StopTail(("b!",)).holdback("ab")  # (the matcher is what the count sees)
    assert calls == [1]


def test_the_engine_keeps_a_long_stop_strings_matching_across_tokens(llm: DeepseekV3ForCausalLM) -> None:
    """The engine feeds each request's holdback only the text a token adds, and streams what it did before."""
    e = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    toks = greedy_alone(llm, e, 20)
    eng = make_engine(llm)
    stop = detok(toks[:3]) + "x" * 16000  # matches the start of the answer for a while, then never
    eng.add(EngineRequest("s", e, SamplingParams(max_tokens=20, temperature=0, stop=(stop,))))
    text, steps = "", 0
    while eng.has_work():
        evs = eng.step()
        if eng._running:
            steps = eng._running[0].tail.steps
            assert steps <= len(detok(eng._running[0].generated))
        text += "".join(ev.get("text", "") for ev in evs)
    assert text == detok(toks) and steps > 0


def test_each_generated_token_decodes_a_few_tokens_not_the_whole_answer(llm: DeepseekV3ForCausalLM) -> None:
    """The engine decoded all of a request's tokens at every step to find the new text: its cost per token
    grew with the answer (3 ms a step at 4k tokens). Now a token decodes a short window; the whole answer
    is decoded once, when it finishes, and the streamed text is the same."""
    e = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    n = 200
    calls: list[int] = []

    def counting_detok(ids: list[int]) -> str:
        calls.append(len(ids))
        return detok(ids)

    eng = Engine(llm, counting_detok, eos_token_ids=set(), max_running=8, kv_cache_tokens=4096, context_length=256)
    res = run_all(eng, {0: [EngineRequest("w", e, SamplingParams(max_tokens=n, temperature=0))]})
    assert res["w"]["text"] == detok(greedy_alone(llm, e, n))
    assert calls.count(n) == 1 and max(c for c in calls if c != n) <= 2


def test_stop_string_across_tokens_that_split_utf8_characters(llm: DeepseekV3ForCausalLM) -> None:
    """Byte-level tokens end in the middle of a character: the partial character (U+FFFD) is never
    streamed, and a stop string whose characters span tokens still ends the answer before it."""
    e = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    toks = greedy_alone(llm, e, 12)

    def stream(ids: list[int]) -> bytes:  # each token is two bytes of a run of 3-byte characters
        return b"".join(chr(0x4E00 + t).encode() for t in ids)

    def detok_bytes(ids: list[int]) -> str:
        return stream(ids)[:2 * len(ids)].decode("utf-8", "replace")

    class BytesStream:  # a token's bytes depend on its position here: the new bytes through an incremental UTF-8 decoder
        def __init__(self) -> None:
            self.ids: list[int] = []
            self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

        def step(self, token: int) -> str | None:
            self.ids.append(token)
            return self.utf8.decode(stream(self.ids)[2 * len(self.ids) - 2:2 * len(self.ids)]) or None

    whole = stream(toks).decode()
    stop = whole[4:6]  # characters 4 and 5: bytes 12-17, tokens 6 to 8
    eng = Engine(llm, detok_bytes, eos_token_ids=set(), max_running=8, kv_cache_tokens=4096, context_length=256,
                 token_streams=BytesStream)
    eng.add(EngineRequest("u", e, SamplingParams(max_tokens=12, temperature=0, stop=(stop,))))
    pieces, final = [], None
    while eng.has_work():
        for ev in eng.step():
            pieces.append(ev.get("text", ""))
            final = ev if ev["type"] == "finish" else final
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == whole[:whole.find(stop)] and final is not None and final["finish_reason"] == "stop"


def test_transformers_engine_behind_the_interface_writes_image_rows_and_streams(llm: DeepseekV3ForCausalLM) -> None:
    """The replica's view: token ids + image rows for the pad positions in, events out; same tokens as
    greedy decoding of the embeddings with the rows written in; stats carry the autoscaler's keys."""
    import asyncio

    from dotsvlm_serving.engine import STATS_KEYS
    from dotsvlm_serving.model.llm import embed_with_images

    pad = 200
    ids = [5, pad, pad, pad, 9, 17]
    rows = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    engine = TransformersEngine(llm, detok, image_token_id=pad, eos_token_ids=set(), max_running=4,
                                kv_cache_tokens=4096, context_length=256)
    engine.add(EngineInput("img", ids, rows.numpy(), SamplingParams(max_tokens=6, temperature=0)))
    engine.add(EngineInput("txt", [5, 9, 17], None, SamplingParams(max_tokens=6, temperature=0)))
    engine.add(EngineInput("gone", [5, 9], None, SamplingParams(max_tokens=50, temperature=0)))
    assert set(STATS_KEYS) <= set(engine.stats()) and engine.stats()["pending"] == 3
    engine.cancel("gone")
    text: dict[str, str] = {}
    final: dict[str, dict] = {}
    while engine.has_work():
        for ev in asyncio.run(engine.step()):
            text[ev["request_id"]] = text.get(ev["request_id"], "") + ev.get("text", "")
            if ev["type"] == "finish":
                final[ev["request_id"]] = ev
    with torch.inference_mode():
        want_img = greedy_alone(llm, embed_with_images(llm, torch.tensor(ids), rows, pad), 6)
        want_txt = greedy_alone(llm, llm.get_input_embeddings()(torch.tensor([5, 9, 17])), 6)
    assert text["img"] == detok(want_img) and text["txt"] == detok(want_txt)
    assert final["gone"]["finish_reason"] == "cancelled" and final["img"]["usage"]["prompt_tokens"] == 6
    with pytest.raises(EngineLimitError, match="maximum context length is 256"):
        engine.add(EngineInput("long", [1] * 250, None, SamplingParams(max_tokens=10)))


def test_one_request_that_fails_in_a_decode_step_ends_alone_and_the_others_decode_as_alone(
        llm: DeepseekV3ForCausalLM, monkeypatch) -> None:
    """A request whose token cannot be sampled in a decode step (say NaN logits for its row) gets an error
    event and leaves the batch; the rest of the batch goes on exactly as before, and step does not raise."""
    from dotsvlm_serving.engine import engine as engine_mod

    real = engine_mod.sample_token
    calls: dict[int | None, int] = {}

    def sample(logits, params, generator):
        calls[params.seed] = calls.get(params.seed, 0) + 1
        if params.seed == 666 and calls[params.seed] == 3:  # its third token: in a decode step
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_mod, "sample_token", sample)
    g = torch.Generator().manual_seed(5)
    good_e, bad_e, late_e = (torch.randn(n, 64, generator=g) for n in (7, 11, 4))
    expected = greedy_alone(llm, good_e, 8)
    late_expected = greedy_alone(llm, late_e, 5)
    eng = make_engine(llm)
    results = run_all(eng, {0: [EngineRequest("good", good_e, SamplingParams(max_tokens=8, temperature=0, seed=1)),
                                EngineRequest("bad", bad_e, SamplingParams(max_tokens=8, temperature=0, seed=666))],
                            1: [EngineRequest("late", late_e, SamplingParams(max_tokens=5, temperature=0, seed=2))]})
    assert results["bad"]["final"]["type"] == "error" and results["bad"]["final"]["code"] == 500
    assert "RuntimeError" in results["bad"]["final"]["message"]
    assert results["good"]["text"] == detok(expected) and results["good"]["final"]["finish_reason"] == "length"
    assert results["late"]["text"] == detok(late_expected)
    assert not eng.has_work()



def _break_decode(llm: DeepseekV3ForCausalLM, monkeypatch):
    """Make the batch's decode forward fail as a broken device does (prefills still run); the real forward."""
    real_forward = llm.forward

    def broken(*args, **kw):
        if "input_ids" in kw:  # the batch's decode, not a prefill
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_forward(*args, **kw)

    monkeypatch.setattr(llm, "forward", broken)
    return real_forward

def test_a_decode_step_that_raises_keeps_the_events_it_made_before(llm: DeepseekV3ForCausalLM, monkeypatch) -> None:
    """The batch's forward failing must not lose what the step already produced: a request that ended in
    its prefill (max_tokens=1) or was cancelled still gets its terminal event (else its client waits for
    nothing and its lease is never given back); the running ones end with an error, the engine is usable."""
    g = torch.Generator().manual_seed(6)
    eng = make_engine(llm)
    eng.add(EngineRequest("running", torch.randn(5, 64, generator=g), SamplingParams(max_tokens=20, temperature=0)))
    eng.add(EngineRequest("gone", torch.randn(5, 64, generator=g), SamplingParams(max_tokens=20, temperature=0)))
    eng.step()
    eng.cancel("gone")
    eng.add(EngineRequest("one", torch.randn(5, 64, generator=g), SamplingParams(max_tokens=1, temperature=0)))
    real_forward = _break_decode(llm, monkeypatch)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        eng.step()
    monkeypatch.setattr(llm, "forward", real_forward)
    assert eng.has_work()
    events = eng.step()
    final = {ev["request_id"]: ev for ev in events if ev["type"] in ("finish", "error")}
    assert final["one"]["type"] == "finish" and final["one"]["finish_reason"] == "length"
    assert final["gone"]["finish_reason"] == "cancelled"
    assert final["running"]["type"] == "error" and final["running"]["code"] == 500
    assert not eng.has_work()
    # The engine serves the next request as if nothing had happened.
    e = torch.randn(6, 64, generator=g)
    assert run_all(eng, {0: [EngineRequest("next", e, SamplingParams(max_tokens=4, temperature=0))]})["next"]["text"] \
        == detok(greedy_alone(llm, e, 4))


def test_batch_forwards_that_keep_failing_make_the_engine_unhealthy(llm: DeepseekV3ForCausalLM, monkeypatch) -> None:
    """A failed batch forward ends its batch, and the next step only hands out that step's events, with no
    forward: that step must not count as the engine working again. Before, the replica's failed-step count
    went 1, 0, 1, 0 with requests coming one at a time, so a replica whose every decode failed (a broken
    device) answered every request with a 500 and was never replaced."""
    import asyncio

    engine = TransformersEngine(llm, detok, image_token_id=200, eos_token_ids=set(), max_running=4,
                                kv_cache_tokens=4096, context_length=256)
    real_forward = _break_decode(llm, monkeypatch)
    for n in range(Engine.MAX_FAILED_FORWARDS):
        assert engine.health_error() is None
        engine.add(EngineInput(f"r{n}", [5, 9, 17], None, SamplingParams(max_tokens=6, temperature=0)))
        with pytest.raises(RuntimeError, match="illegal memory access"):
            asyncio.run(engine.step())
        final = [ev for ev in asyncio.run(engine.step()) if ev["request_id"] == f"r{n}"][-1]
        assert final["type"] == "error" and not engine.has_work()
    assert "illegal memory access" in (engine.health_error() or "")
    # A forward that works again counts: the run of failures is over.
    monkeypatch.setattr(llm, "forward", real_forward)
    engine.add(EngineInput("ok", [5, 9, 17], None, SamplingParams(max_tokens=3, temperature=0)))
    while engine.has_work():
        asyncio.run(engine.step())
    assert engine.health_error() is None
