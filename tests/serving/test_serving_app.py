"""The Serve application end to end on a local Ray (CPU, tiny model).

Order matters: the failure-injection test (killing replicas) runs last in this module.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from serving_support import API_KEY, Served, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.ray]
MODEL = "dots.vlm1"


def png(w: int, h: int, color: tuple[int, int, int] = (200, 40, 40), pattern: bool = True) -> bytes:
    img = Image.new("RGB", (w, h), color)
    if pattern:  # some structure so different images give different embeddings
        px = img.load()
        for x in range(0, w, 7):
            for y in range(0, h, 5):
                px[x, y] = ((x * 3) % 256, (y * 5) % 256, (x + y) % 256)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(b: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(b).decode()


def image_part(b: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(b)}}


def chat(**kw) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 8}
    body.update(kw)
    return body


def assert_healthy_and_serving(served: Served) -> None:
    wait_healthy(served.url, 120)
    with served.client() as c:
        r = c.post("/v1/chat/completions", json=chat(max_tokens=4, ignore_eos=True))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4


# --------------------------------------------------------------------------------------- openai client
def test_official_openai_client(served: Served) -> None:
    from openai import AuthenticationError, NotFoundError, OpenAI

    client = OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.max_model_len > 0  # type: ignore[attr-defined]  (vLLM's extra field)
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-4o")

    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=10,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10 and isinstance(r.choices[0].message.content, str)

    msgs = [{"role": "system", "content": "You describe images."},
            {"role": "user", "content": [{"type": "text", "text": "Compare these:"},
                                         image_part(png(64, 64)), image_part(png(300, 200, (0, 120, 0)))]},
            {"role": "assistant", "content": "Two pictures."},
            {"role": "user", "content": [image_part(png(90, 160)), {"type": "text", "text": "And this one?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0.7, top_p=0.9, seed=3)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 100  # three images' pads
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0.7, top_p=0.9, seed=3)
    assert r2.choices[0].message.content == r.choices[0].message.content  # seeded sampling is reproducible

    for content in ["Stream me.", [image_part(png(100, 100)), {"type": "text", "text": "Stream about it."}]]:
        ask = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 9, "temperature": 0,
               "extra_body": {"ignore_eos": True}}
        stream = client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and text == client.chat.completions.create(**ask).choices[0].message.content  # the same answer

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()


# --------------------------------------------------------------------------------------- equivalence
def test_disaggregated_path_equals_single_process_reference(served: Served) -> None:
    from dotsvlm_serving.model.preprocess import decode_image
    from dotsvlm_serving.reference import ReferencePipeline
    from dotsvlm_serving.serve_config import ImageLimits

    ref = ReferencePipeline(served.model_dir, limits=ImageLimits.model_validate(served.config["api"]["images"]))
    imgs = {k: png(*v) for k, v in {"a": (64, 64), "b": (300, 200), "c": (90, 160), "d": (800, 600),
                                     "e": (28, 500), "f": (150, 150)}.items()}
    cases = [  # (messages with image keys, max_tokens, ignore_eos)
        ([{"role": "user", "content": "Tell me a story about a lighthouse."}], 14, True),
        ([{"role": "user", "content": ["a", "What is this?"]}], 12, True),
        ([{"role": "user", "content": ["b", "c", "Compare."]}], 10, True),
        ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": ["d", "Describe."]}], 16, True),
        ([{"role": "user", "content": ["e", "f", "a", "Three images."]}], 8, True),
        ([{"role": "user", "content": ["c", "First."]}, {"role": "assistant", "content": "A picture."},
          {"role": "user", "content": ["b", "Second?"]}], 11, True),
        ([{"role": "user", "content": "Natural end?"}], 40, False),
        ([{"role": "user", "content": ["f", "Natural end with an image?"]}], 40, False),
    ]

    def to_api(msgs: list[dict]) -> list[dict]:
        out = []
        for m in msgs:
            if isinstance(m["content"], str):
                out.append(m)
            else:
                out.append({"role": m["role"], "content": [image_part(imgs[p]) if p in imgs else {"type": "text", "text": p}
                                                           for p in m["content"]]})
        return out

    def to_ref(msgs: list[dict]) -> tuple[list[dict], list[Image.Image]]:
        out, images = [], []
        for m in msgs:
            if isinstance(m["content"], str):
                out.append(m)
                continue
            parts = []
            for p in m["content"]:
                if p in imgs:
                    parts.append({"type": "image"})
                    images.append(decode_image(imgs[p], max_bytes=10**7))
                else:
                    parts.append({"type": "text", "text": p})
            out.append({"role": m["role"], "content": parts})
        return out, images

    expected = []
    for msgs, n, ignore in cases:
        m, ims = to_ref(msgs)
        expected.append(ref.generate_ids(m, ims, n, ignore_eos=ignore))

    def call(case: tuple) -> dict:
        msgs, n, ignore = case
        with served.client() as c:
            r = c.post("/v1/chat/completions", json=chat(messages=to_api(msgs), max_tokens=n, temperature=0,
                                                        ignore_eos=ignore))
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(cases)) as pool:  # concurrent: they share vision batches and decode steps
        got = list(pool.map(call, cases))
    for (msgs, n, ignore), ids, resp in zip(cases, expected, got):
        assert resp["usage"]["completion_tokens"] == len(ids), msgs
        assert resp["choices"][0]["message"]["content"] == ref.tokenizer.decode(ids, skip_special_tokens=True), msgs
        assert resp["choices"][0]["finish_reason"] == ("length" if len(ids) == n else "stop")
    # The end-of-sequence path is covered: the seeded tiny model ends "Natural end?" by itself (after 3 of
    # 40 tokens), and the API said "stop" for it above.
    ended = [msgs for (msgs, n, ignore), ids in zip(cases, expected) if not ignore and len(ids) < n]
    assert ended, "no case without ignore_eos ended at EOS: pick a prompt the tiny model ends by itself"


def test_embeddings_sent_by_nixl_give_the_object_stores_answers(served: Served) -> None:
    """`queue.embeddingTransport: NIXL`: the vision replica keeps its embeddings and the LLM replica pulls them
    with Ray's direct transport (NIXL, here CPU memory to CPU memory); the answers are token for token those
    of the object store's path. (The vision replica's slice is applied through its `reconfigure`, called
    here directly: that Serve applies a vision slice in place is test_rollout_ray's, and that the setting
    reaches the slice is test_operator_builders'.)"""
    from ray import serve

    from dotsvlm_serving.serve_config import APP_NAME, VISION_DEPLOYMENT, ServeAppConfig

    vision = serve.get_deployment_handle(VISION_DEPLOYMENT, APP_NAME)  # one replica here
    cases = [([image_part(png(300, 200)), {"type": "text", "text": "Describe."}], 12),
             ([image_part(png(64, 64)), image_part(png(90, 160)), {"type": "text", "text": "Compare."}], 10)]

    def answers() -> list[str]:
        with served.client() as c:
            out = []
            for content, n in cases:
                r = c.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": content}],
                                                            max_tokens=n, temperature=0, ignore_eos=True))
                assert r.status_code == 200, r.text
                out.append(r.json()["choices"][0]["message"]["content"])
            return out

    def use(transport: str) -> None:
        cfg = ServeAppConfig.model_validate({**served.config, "queue": {**served.config["queue"],
                                                                        "embedding_transport": transport}})
        vision.reconfigure.remote(cfg.vision_encoder_config().model_dump(mode="json")).result(timeout_s=60)

    def direct_answers() -> float:
        return vision.stats.remote().result(timeout_s=30)["answers_direct"]

    by_store = answers()
    before = direct_answers()
    use("nixl")
    try:
        assert answers() == by_store
        assert direct_answers() == before + len(cases)  # they did travel by NIXL
    finally:
        use("object-store")
    assert answers() == by_store and direct_answers() == before + len(cases)
    assert_healthy_and_serving(served)


# --------------------------------------------------------------------------------------- burst
def test_burst_larger_than_the_queue(served: Served) -> None:
    n = 40  # queue holds 6, two LLM replicas run 4 each: most of the burst must be refused with 429

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, dict, httpx.Headers]:
        body = chat(max_tokens=120, ignore_eos=True, messages=[{"role": "user", "content": f"Request {i}"}])
        if i % 3 == 0:
            body["messages"] = [{"role": "user", "content": [image_part(png(60 + i, 50)), {"type": "text", "text": "x"}]}]
        r = await client.post("/v1/chat/completions", json=body)
        return r.status_code, r.json(), r.headers

    async def burst() -> list[tuple[int, dict, httpx.Headers]]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=120, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n))), timeout=180)

    results = asyncio.run(burst())
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 429, 503}, codes
    ok = [b for c, b, _ in results if c == 200]
    refused = [(b, h) for c, b, h in results if c == 429]
    assert ok and refused, codes
    for b in ok:  # complete answers
        assert b["choices"][0]["finish_reason"] == "length" and b["usage"]["completion_tokens"] == 120
    for b, h in refused:
        assert int(h["retry-after"]) >= 1 and b["error"]["type"] == "rate_limit_exceeded"
        assert "retry" in b["error"]["message"]
    assert len(ok) + len(refused) + codes.count(503) == n
    assert_healthy_and_serving(served)
    stats = served.queue_stats()
    assert stats["depth"] == 0 and stats["counters"]["rejected_full"] >= len(refused)


# --------------------------------------------------------------------------------------- malformed
def _corrupt_png() -> bytes:
    b = png(64, 64)
    return b[: len(b) // 2]


MALFORMED: list[tuple[str, dict | bytes, int, str]] = [
    ("bad-json", b"{not json", 400, "not valid JSON"),
    ("empty-body", b"", 400, "empty"),
    ("json-array", b"[]", 400, "JSON object"),
    ("missing-messages", {"model": MODEL}, 400, "messages"),
    ("empty-messages", chat(messages=[]), 400, "at least 1"),
    ("content-wrong-type", chat(messages=[{"role": "user", "content": 42}]), 400, "content"),
    ("unknown-role", chat(messages=[{"role": "robot", "content": "x"}]), 400, "role"),
    ("unknown-part-type", chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400, "content[0]"),
    ("temperature-string", chat(temperature="warm"), 400, "temperature"),
    ("max-tokens-negative", chat(max_tokens=-5), 400, "max_tokens"),
    ("n-greater-than-1", chat(n=3), 400, "n > 1"),
    ("unknown-model", chat(model="gpt-4"), 404, "does not exist"),
    ("image-in-system", chat(messages=[{"role": "system", "content": [image_part(png(30, 30))]},
                                       {"role": "user", "content": "x"}]), 400, "only accepted in user"),
    ("corrupt-image", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": data_url(b"this is not an image at all")}}]}]), 400, "image 1"),
    ("truncated-png", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": data_url(_corrupt_png())}}]}]), 400, "image 1"),
    ("huge-image-bytes", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + "A" * 1_500_000}}]}]), 413, "limit"),
    ("too-many-images", chat(messages=[{"role": "user", "content": [image_part(png(30, 30))] * 5}]), 400, "over the limit of 4"),
    ("extreme-aspect-ratio", chat(messages=[{"role": "user", "content": [image_part(png(2000, 5, pattern=False))]}]),
     400, "aspect ratio"),
    ("non-image-data-url", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:text/html;base64,PGgxPg=="}}]}]), 400, "image/*"),
    ("bad-base64", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,!!!notbase64"}}]}]), 400, "base64"),
    ("ftp-url", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "ftp://example.com/a.png"}}]}]), 400, "scheme"),
    ("file-url", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "file:///etc/passwd"}}]}]), 400, "scheme"),
    ("loopback-url", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://127.0.0.1:1/x.png"}}]}]), 400, "non-public"),
    ("localhost-url", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://localhost/x.png"}}]}]), 400, "non-public"),
    ("private-url", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://10.0.0.8/x.png"}}]}]), 400, "non-public"),
    ("metadata-url", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://169.254.169.254/latest/meta-data/"}}]}]), 400, "non-public"),
    ("ipv6-loopback-url", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://[::1]/x.png"}}]}]), 400, "non-public"),
    ("over-long-prompt", chat(messages=[{"role": "user", "content": "word " * 3000}]), 400, "maximum context length"),
    ("max-tokens-over-context", chat(max_tokens=5000), 400, "maximum context length"),
    ("reserved-token-in-text", chat(messages=[{"role": "user", "content": "hi <|imgpad|> there"}]), 400, "reserved token"),
    ("too-many-stops", chat(stop=["a", "b", "c", "d", "e"]), 400, "at most 4"),
    ("body-too-large", chat(messages=[{"role": "user", "content": "x" * 7_000_000}]), 413, "request body"),
    ("assistant-last", chat(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
     400, "last message"),
    ("malformed-ipv6-url", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://[::1/x.png"}}]}]), 400, "malformed"),
    ("tool-choice-required", chat(tool_choice="required"), 400, "tool_choice is not supported"),
    ("seed-overflow", chat(seed=2**64), 400, "seed"),
    ("vllm-stop-token-ids", chat(stop_token_ids=[1]), 400, "stop_token_ids is not supported"),
]


@pytest.mark.parametrize("name, body, status, fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_clear_4xx(served: Served, name: str, body: dict | bytes, status: int,
                                          fragment: str) -> None:
    with served.client() as c:
        if isinstance(body, bytes):
            r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        else:
            r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"], err
    assert err["type"] and set(err) == {"message", "type", "param", "code"}


def test_a_chunked_upload_over_the_body_limit_gets_413(served: Served) -> None:
    def chunks():  # no Content-Length: the limit can only be found by reading
        yield b'{"model": "dots.vlm1", "messages": [{"role": "user", "content": "'
        for _ in range(8):
            yield b"x" * 1_000_000
        yield b'"}]}'

    with served.client() as c:
        r = c.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "request body is over the" in r.json()["error"]["message"], r.text


def test_auth_routes_and_fetch_allow_list(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as anon:
        r = anon.post("/v1/chat/completions", json=chat())
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = anon.post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert anon.get("/health").status_code == 200  # probes need no key
        assert anon.get("/nope").status_code == 404 and "no such endpoint" in anon.get("/nope").json()["error"]["message"]
        wrong_method = anon.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and wrong_method.headers.get("allow") == "POST"
        assert "use POST" in wrong_method.json()["error"]["message"]
    with served.client() as c:
        # an allow-listed local image server is fetched; the same content by data: URL gives the same prompt size
        r = c.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": served.image_server + "/cat.png"}}, {"type": "text", "text": "?"}]}]))
        assert r.status_code == 200, r.text
        r404 = c.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": served.image_server + "/missing.png"}}]}]))
        assert r404.status_code == 400 and "HTTP 404" in r404.json()["error"]["message"]
        stop = c.post("/v1/chat/completions", json=chat(max_tokens=30, stop=["e", "a", "o", "i"], temperature=0))
        assert stop.status_code == 200
    assert_healthy_and_serving(served)


def test_a_response_carries_one_request_id_the_clients_own(served: Served) -> None:
    """Serve answers with the request's x-request-id (the client's, or one it makes), the id in its access log; a
    stream also carried its completion id under the same header, so clients read both joined ("id, chatcmpl-...")."""
    with served.client() as c:
        for stream in (False, True):
            with c.stream("POST", "/v1/chat/completions", json=chat(stream=stream),
                          headers={"x-request-id": f"mine-{stream}"}) as r:
                assert r.status_code == 200 and r.headers.get_list("x-request-id") == [f"mine-{stream}"], r.headers
                r.read()


def wait_cancelled(served: Served, before: float) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = served.queue_stats()
        if stats["counters"]["cancelled"] > before and stats["leased"] == 0:
            return
        time.sleep(0.3)
    raise AssertionError("the abandoned request was not cancelled")


def test_client_disconnect_cancels_generation(served: Served) -> None:
    # streaming: hang up after the first token
    before = served.queue_stats()["counters"]["cancelled"]
    with served.client() as c:
        with c.stream("POST", "/v1/chat/completions", json=chat(max_tokens=900, ignore_eos=True, stream=True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    break
    wait_cancelled(served, before)
    # not streaming: the client gives up waiting
    before = served.queue_stats()["counters"]["cancelled"]
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=1.0) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=chat(max_tokens=900, ignore_eos=True))
    wait_cancelled(served, before)


# --------------------------------------------------------------------------------------- /v1/completions
def completion(**kw) -> dict:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8}
    body.update(kw)
    return body


def test_completions_continue_the_prompt_as_chat_does(served: Served) -> None:
    """/v1/completions on the transformers engine: the chat template's own text as the prompt gives the chat
    answer (greedy), as text or as token ids, whole or streamed; OpenAI's default of 16 tokens."""
    from openai import OpenAI

    from dotsvlm_serving.model.prompt import load_tokenizer, render_chat

    client = OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "Tell me about lighthouses."}]
    prompt = render_chat(msgs, [])
    greedy = {"temperature": 0, "extra_body": {"ignore_eos": True}}
    by_chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, **greedy)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **greedy)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == by_chat.choices[0].message.content and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (by_chat.usage.prompt_tokens, 12)

    ids = load_tokenizer(served.model_dir).encode(prompt, add_special_tokens=False)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, **greedy)
    assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **greedy))
    assert all(c.object == "text_completion" for c in chunks) and len(chunks) >= 4  # streamed, not one blob
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12

    default = client.completions.create(model=MODEL, prompt="Once upon a time", extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"
    seeded = [client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0.8,
                                        seed=5).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


COMPLETION_ERRORS: list[tuple[str, dict | bytes, int, str]] = [
    ("bad-json", b"{not json", 400, "not valid JSON"),
    ("missing-prompt", {"model": MODEL}, 400, "prompt"),
    ("n-greater-than-1", completion(n=2), 400, "n > 1 is not supported by this server (llm.engine transformers)"),
    ("logprobs", completion(logprobs=1), 400, "logprobs are not supported by this server (llm.engine transformers)"),
    ("echo", completion(echo=True), 400, "echo is not supported"),
    ("prompt-batch", completion(prompt=["a", "b"]), 400, "a batch of 2 prompts is not supported"),
    ("image-pad-in-prompt", completion(prompt="hi <|imgpad|> there"), 400, "image-pad token"),
    ("token-outside-vocabulary", completion(prompt=[1, 10_000_000]), 400, "outside the vocabulary"),
    ("over-long-prompt", completion(prompt="word " * 3000), 400, "in the prompt"),
    ("max-tokens-over-context", completion(max_tokens=5000), 400, "maximum context length is 1024"),
    ("unknown-model", completion(model="gpt-4"), 404, "does not exist"),
    ("too-many-stops", completion(stop=["a", "b", "c", "d", "e"]), 400, "at most 4"),
]


@pytest.mark.parametrize("name, body, status, fragment", COMPLETION_ERRORS, ids=[m[0] for m in COMPLETION_ERRORS])
def test_completions_errors_and_limits_are_the_chat_endpoints(served: Served, name: str, body: dict | bytes,
                                                              status: int, fragment: str) -> None:
    with served.client() as c:
        if isinstance(body, bytes):
            r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        else:
            r = c.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}
    with httpx.Client(base_url=served.url, timeout=30) as anon:
        assert anon.post("/v1/completions", json=completion()).status_code == 401


def test_the_model_cards_request_and_what_it_needs_here(served: Served) -> None:
    """The dots.vlm1 README's request for the authors' SGLang server, sent unchanged: its "model": "model"
    is refused with the name this server serves (servedName: model makes it pass), and its max_tokens
    32768 needs a longer context than this test deployment's 1024 (the production spec has 65536)."""
    card = {"model": "model", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello, how are you?"}]}],
            "temperature": 0.1, "top_p": 0.9, "max_tokens": 32768}
    with served.client() as c:
        r = c.post("/v1/chat/completions", json=card)
        assert r.status_code == 404 and f"this server serves '{MODEL}'" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={**card, "model": MODEL})
        assert r.status_code == 400 and "maximum context length is 1024" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={**card, "model": MODEL, "max_tokens": 16})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# --------------------------------------------------------------------------------------- failures (last)
def _replica_actor(deployment: str):
    import ray

    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith("SERVE_REPLICA::") and f"#{deployment}#" in a["name"]:
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise AssertionError(f"no replica of {deployment}")


def _fire(served: Served, bodies: list[dict]) -> list[tuple[int, dict | str]]:
    async def one(client: httpx.AsyncClient, body: dict) -> tuple[int, dict | str]:
        if body.get("stream"):
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                text = (await r.aread()).decode()
                return r.status_code, text
        r = await client.post("/v1/chat/completions", json=body)
        return r.status_code, r.json()

    async def run() -> list:
        async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=150) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, b) for b in bodies)), timeout=170)

    return asyncio.run(run())


def test_killed_replicas_fail_cleanly_or_retry_and_never_hang(served: Served) -> None:
    import ray
    from ray import serve

    from dotsvlm_serving.serve_config import APP_NAME

    # 1) LLM replica killed while it holds requests: non-streaming ones are redelivered, streaming ones that
    #    already sent tokens fail with a clear in-stream error. Enough requests that both replicas hold some.
    redelivered = served.queue_stats()["counters"]["redelivered"]
    bodies = [chat(max_tokens=300, ignore_eos=True, messages=[{"role": "user", "content": f"long {i}"}],
                   stream=(i == 0)) for i in range(8)]
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_fire, served, bodies)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until every replica holds work
            consumers = served.queue_stats()["consumers"]
            if len(consumers) == 2 and all(c["leased"] > 0 for c in consumers.values()):
                break
            time.sleep(0.1)
        time.sleep(0.5)
        ray.kill(_replica_actor("LLMServer"), no_restart=True)
        results = fut.result(timeout=200)
    for code, body in results:
        if isinstance(body, str):  # the stream
            assert code == 200 and ("data: [DONE]" in body) and ('"finish_reason":"length"' in body or
                                                                 "please retry" in body), body[-500:]
        else:
            assert (code == 200 and body["usage"]["completion_tokens"] == 300) or (
                code == 503 and "retry" in body["error"]["message"]), body
    assert sum(1 for c, b in results if c == 200 and isinstance(b, dict)) >= 1
    assert served.queue_stats()["counters"]["redelivered"] > redelivered
    assert_healthy_and_serving(served)

    # 2) Vision replica killed while it holds images (queued for a batch or being encoded): Serve's router
    #    re-sends those calls to the replacement replica, the ingress re-encodes if embeddings were lost after
    #    encoding; every request completes or fails with a clear 5xx, none hangs.
    big = [image_part(png(1400 + 10 * j, 1400)) for j in range(4)]  # enough work to keep the replica busy
    bodies = [chat(max_tokens=6, messages=[{"role": "user", "content": big + [{"type": "text", "text": str(i)}]}])
              for i in range(16)]
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_fire, served, bodies)
        vision = serve.get_deployment_handle("VisionEncoder", APP_NAME)
        deadline = time.monotonic() + 60
        held = 0.0
        while time.monotonic() < deadline and not held:  # kill only once the replica itself holds images
            st = vision.stats.remote().result(timeout_s=10)
            held = st["backlog_images"] + st["encoding_images"]
            time.sleep(0.01)
        victim = _replica_actor("VisionEncoder")
        ray.kill(victim, no_restart=True)
        assert held > 0, "the vision replica never held images"
        results = fut.result(timeout=200)
    for code, body in results:
        assert code == 200 or (code in (429, 500, 503) and body["error"]["message"]), body
    assert sum(1 for code, _ in results if code == 200) >= len(results) // 2, [c for c, _ in results]
    assert _replica_actor("VisionEncoder")._actor_id != victim._actor_id  # a replacement served them
    assert_healthy_and_serving(served)
    with served.client() as c:
        r = c.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": [image_part(png(50, 50))]}]))
    assert r.status_code == 200, r.text


def test_queue_replica_lost_under_load_every_request_completes_or_fails_with_503(served: Served) -> None:
    """The tensor queue's replica dies while it holds queued and leased work: each ingress enqueues its
    requests again on the replacement Serve starts, streams that already sent tokens end with a clear
    503, nothing hangs, every request is accounted for, and the service serves again by itself."""
    import ray

    n_stream = 2
    bodies = [chat(max_tokens=60, ignore_eos=True, stream=(i < n_stream),
                   messages=[{"role": "user", "content": ([image_part(png(64, 64))] if i % 3 == 2 else [])
                              + [{"type": "text", "text": f"queue loss {i}"}]}]) for i in range(9)]
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_fire, served, bodies)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill once the queue holds leases (and, likely, waiting items)
            if "dotsvlm_queue_leased_items 0.0" not in httpx.get(served.url + "/metrics").text:
                break
            time.sleep(0.05)
        victim = _replica_actor("TensorQueue")
        killed_at = time.monotonic()
        ray.kill(victim, no_restart=True)
        wait_healthy(served.url, 60)  # a replacement answers (health asks the queue for its stats)
        recovered_s = time.monotonic() - killed_at
        results = fut.result(timeout=200)  # nothing hangs
    tally: dict[str, int] = {}
    for i, (code, body) in enumerate(results):
        if isinstance(body, str):  # a stream
            assert code in (200, 503), body[-500:]
            if code == 200:
                assert "data: [DONE]" in body and ('"finish_reason":"length"' in body or "retry" in body), body[-500:]
                kind = "stream-complete" if '"finish_reason":"length"' in body else "stream-503"
            else:
                kind = "503"
        elif code == 200:
            assert body["usage"]["completion_tokens"] == 60, body
            kind = "200"
        else:
            assert code in (429, 503) and "retry" in body["error"]["message"].lower(), (code, body)
            kind = str(code)
        tally[kind] = tally.get(kind, 0) + 1
    assert sum(tally.values()) == len(bodies), tally  # every request accounted for: none silently dropped
    assert tally.get("200", 0) >= 1, tally  # non-streaming work in flight was enqueued again and completed
    # The service recovers by itself: a replacement queue replica serves new requests.
    assert_healthy_and_serving(served)
    assert _replica_actor("TensorQueue")._actor_id != victim._actor_id
    print(f"queue loss: outcomes {tally}; healthy again {recovered_s:.1f} s after the kill")
