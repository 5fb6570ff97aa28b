"""API building blocks without Ray: request validation, OpenAI error format, image URLs (data: and
http(s) with SSRF protection against a local server), API keys."""

from __future__ import annotations

import asyncio
import base64
import http.server
import ipaddress
import json
import threading
import time
from collections.abc import Iterator

import pytest

from dotsvlm_serving.api.auth import ApiKeyAuth
from dotsvlm_serving.api.errors import ApiError
from dotsvlm_serving.api.images import FetchPolicy, is_public_address, load_image_bytes
from dotsvlm_serving.api.openai_models import (CompletionRequest, parse_chat_request, parse_completion_request,
                                              text_completion_chunk, text_completion_response)

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg==")


def req(**kw) -> bytes:
    body = {"model": "dots.vlm1", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return json.dumps(body).encode()


@pytest.mark.parametrize("body, fragment", [
    (b"", "empty"),
    (b"{not json", "not valid JSON"),
    (b"[1]", "JSON object"),
    (json.dumps({"model": "m"}).encode(), "messages"),
    (req(messages=[]), "at least 1"),
    (req(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (req(messages=[{"role": "user", "content": 5}]), "string or a list of content parts"),
    (req(messages=[{"role": "user", "content": [{"type": "video"}]}]), "messages[0].content[0]"),
    (req(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content[0].image_url"),
    (req(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
                   {"role": "user", "content": "x"}]), "only accepted in user messages"),
    (req(temperature="hot"), "temperature"),
    (req(temperature=3), "temperature"),
    (req(top_p=0), "top_p"),
    (req(max_tokens=0), "max_tokens"),
    (req(n=2), "n > 1"),
    (req(logprobs=True), "logprobs are not supported"),
    (req(response_format={"type": "json_object"}), "response_format json_object (structured output) is not supported"),
    (req(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
     "response_format json_schema"),
    (req(response_format={"type": "yaml"}), "response_format.type"),
    (req(logit_bias={"42": 10}), "logit_bias is not supported"),
    (req(top_logprobs=3), "top_logprobs is not supported"),
    (req(regex="[a-z]+"), "regex is not supported"),
    (req(guided_json={"type": "object"}), "guided_json is not supported"),
    (req(repetition_penalty=1.2), "repetition_penalty is not supported"),
    (req(min_p=0.1), "min_p is not supported"),
    (req(stop=["a", "b", "c", "d", "e"]), "at most 4"),
    (req(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]), "last message"),
    (req(seed=2**64), "seed"),
    (req(seed=-(2**63) - 1), "seed"),
    (req(tool_choice="required"), "tool_choice is not supported"),
    (req(functions=[{"name": "f", "parameters": {}}]), "functions is not supported"),
    (req(function_call={"name": "f"}), "function_call is not supported"),
    (req(stream_options={"include_usage": True}), "stream_options is only allowed when stream is true"),
])
def test_bad_requests_get_400_with_the_field(body: bytes, fragment: str) -> None:
    with pytest.raises(ApiError) as ei:
        parse_chat_request(body)
    assert ei.value.status == 400 and fragment in ei.value.message
    body_json = ei.value.body()
    assert set(body_json["error"]) == {"message", "type", "param", "code"}
    assert body_json["error"]["type"] == "invalid_request_error"


def test_refusals_of_n_and_logprobs_name_the_deployments_engine() -> None:
    with pytest.raises(ApiError, match=r"n > 1 is not supported by this server \(llm.engine vllm\)"):
        parse_chat_request(req(n=2), engine="vllm")
    with pytest.raises(ApiError, match=r"logprobs are not supported by this server \(llm.engine transformers\)"):
        parse_chat_request(req(logprobs=True), engine="transformers")


def completion(**kw) -> bytes:
    body = {"model": "dots.vlm1", "prompt": "Once upon a time"}
    body.update(kw)
    return json.dumps(body).encode()


@pytest.mark.parametrize("body, fragment, param", [
    (b"", "empty; send a JSON completions request", None),
    (json.dumps({"model": "dots.vlm1"}).encode(), "prompt: Field required", "prompt"),
    (completion(prompt=""), "must not be empty", "prompt"),
    (completion(prompt=[]), "must not be empty", "prompt"),
    (completion(prompt=["a", "b"]), "a batch of 2 prompts is not supported", "prompt"),
    (completion(prompt=[[1, 2], [3]]), "a batch of 2 prompts is not supported", "prompt"),
    (completion(prompt=[1, "a"]), "a string or a list of token ids", "prompt"),
    (completion(n=3), "n > 1 is not supported by this server (llm.engine transformers)", "n"),
    (completion(logprobs=2), "logprobs are not supported by this server (llm.engine transformers)", "logprobs"),
    (completion(logprobs=99), "logprobs", "logprobs"),
    (completion(echo=True), "echo is not supported", "echo"),
    (completion(suffix="end"), "suffix is not supported", "suffix"),
    (completion(best_of=3), "best_of is not supported", "best_of"),
    (completion(max_tokens=0), "max_tokens", "max_tokens"),
    (completion(stop=["a", "b", "c", "d", "e"]), "at most 4", "stop"),
    (completion(presence_penalty=1), "presence_penalty", "presence_penalty"),
    (completion(temperature=5), "temperature", "temperature"),
    (completion(response_format={"type": "json_object"}), "response_format json_object (structured output)",
     "response_format"),
    (completion(tools=[{"type": "function", "function": {"name": "f"}}]), "tools / function calling", "tools"),
    (completion(stream_options={"include_usage": True}), "only allowed when stream is true", "stream_options"),
])
def test_bad_completion_requests_get_400_with_the_field(body: bytes, fragment: str, param: str | None) -> None:
    with pytest.raises(ApiError) as ei:
        parse_completion_request(body, engine="transformers")
    assert ei.value.status == 400 and fragment in ei.value.message, ei.value.message
    assert ei.value.body()["error"]["param"] == param


def test_completion_requests_take_one_prompt_as_text_or_token_ids_with_openais_defaults() -> None:
    r = parse_completion_request(completion(stream=True, stream_options={"include_usage": True}, stop="\n", seed=1,
                                            logprobs=None, echo=False, n=1, user="u"))
    assert isinstance(r, CompletionRequest) and r.prompt == "Once upon a time" and r.stop == ["\n"]
    assert r.max_tokens == 16 and r.completion_limit() == 16  # OpenAI's default for completions
    assert parse_completion_request(completion(prompt=["just one"])).prompt == "just one"
    assert parse_completion_request(completion(prompt=[5, 6, 7], max_tokens=3)).prompt == [5, 6, 7]
    assert parse_completion_request(completion(prompt=[[5, 6]])).prompt == [5, 6]


def test_text_completion_response_shapes() -> None:
    body = text_completion_response("cmpl-1", "m", "ever after", "length", {"prompt_tokens": 4, "completion_tokens": 2})
    assert body["object"] == "text_completion" and body["choices"] == [
        {"index": 0, "text": "ever after", "finish_reason": "length", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert text_completion_chunk("cmpl-1", "m", 1, text="a")["choices"][0]["text"] == "a"
    last = text_completion_chunk("cmpl-1", "m", 1, usage={"prompt_tokens": 1, "completion_tokens": 1})
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 2


def test_the_model_cards_sglang_request_is_accepted_as_it_is() -> None:
    """The request of the dots.vlm1 README ("API Usage"; the authors' SGLang server), unchanged. Its
    "model": "model" needs servedName "model" and its max_tokens a context of more than 32768 tokens, as
    the production spec has: docs/serving.md."""
    card = {"model": "model", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello, how are you?"}]}],
            "temperature": 0.1, "top_p": 0.9, "max_tokens": 32768}
    r = parse_chat_request(json.dumps(card).encode())
    assert (r.model, r.temperature, r.top_p, r.completion_limit()) == ("model", 0.1, 0.9, 32768)
    assert r.to_model_messages() == ([{"role": "user", "content": [{"type": "text", "text": "Hello, how are you?"}]}], [])


def test_neutral_values_of_unsupported_fields_and_text_response_format_are_accepted() -> None:
    r = parse_chat_request(req(response_format={"type": "text"}, logit_bias={}, repetition_penalty=1.0, min_p=0,
                               logprobs=False, top_logprobs=0, user="u1", seed=7, tool_choice="none",
                               stream=False, stream_options=None))
    assert r.response_format is not None and r.response_format.type == "text" and r.seed == 7
    assert parse_chat_request(req(seed=2**63 - 1, tool_choice="auto", functions=[])).seed == 2**63 - 1
    assert parse_chat_request(req(add_generation_prompt=True, chat_template=None, stop_token_ids=[],
                                  include_stop_str_in_output=False, spaces_between_special_tokens=True)).n == 1


@pytest.mark.parametrize("field, value", [
    ("stop_token_ids", [128001]),  # vLLM's and SGLang's: end the answer at these token ids
    ("include_stop_str_in_output", True),  # vLLM's: keep the stop string in the text
    ("no_stop_trim", True),  # SGLang's spelling of the same
    ("bad_words", ["darn"]),
    ("allowed_token_ids", [1, 2, 3]),
    ("logits_processors", ["my.module:Processor"]),
    ("length_penalty", 0.5),
    ("truncate_prompt_tokens", 100),  # the prompt would be cut to its last 100 tokens
    ("add_generation_prompt", False),  # the prompt would end without the assistant's tag
    ("chat_template", "{{ messages }}"),  # another template than the model's
    ("return_tokens_as_token_ids", True),
    ("spaces_between_special_tokens", False),
])
def test_vllm_and_sglang_extensions_that_change_the_answer_are_refused_not_ignored(field: str, value) -> None:
    """A vLLM or SGLang user sends these through extra_body; ignoring them answers something else than asked
    (a stop token not honoured, the stop string missing from the text, a prompt not truncated)."""
    chat_only = field in ("add_generation_prompt", "chat_template")  # a text completion has no chat template
    for parse, body in [(parse_chat_request, req(**{field: value}))] + (
            [] if chat_only else [(parse_completion_request, completion(**{field: value}))]):
        with pytest.raises(ApiError) as ei:
            parse(body)
        err = ei.value.body()["error"]
        assert ei.value.status == 400 and f"{field} is not supported" in err["message"], err
        assert err["param"] == field and err["code"] == "unsupported_parameter", err


def test_refusals_of_unsupported_fields_name_the_field_as_param() -> None:
    """OpenAI's own refusal of a parameter names it in error.param (clients show it): ours too."""
    for body, param in [(req(logit_bias={"42": 10}), "logit_bias"), (req(n=2), "n"), (req(logprobs=True), "logprobs"),
                        (req(presence_penalty=1), "presence_penalty"), (req(frequency_penalty=-1), "frequency_penalty"),
                        (req(response_format={"type": "json_object"}), "response_format"),
                        (req(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
                        (req(stream_options={"include_usage": True}), "stream_options")]:
        with pytest.raises(ApiError) as ei:
            parse_chat_request(body)
        assert ei.value.param == param, (param, ei.value.message)


def test_fields_openai_allows_to_be_null_take_their_default() -> None:
    """OpenAI's API (and vLLM's server) take null for these optional fields, as 'use the default'; some
    clients send every field, null when unset."""
    r = parse_chat_request(req(stream=None, n=None, ignore_eos=None, stream_options=None))
    assert (r.stream, r.n, r.ignore_eos) == (False, 1, False)
    r = parse_chat_request(req(stream=True, stream_options={"include_usage": None}))
    assert r.stream and r.stream_options is not None and not r.stream_options.include_usage
    r = parse_completion_request(completion(stream=None, n=None, echo=None))
    assert (r.stream, r.n) == (False, 1)


def test_stream_options_beyond_include_usage() -> None:
    """OpenAI's include_obfuscation only pads chunks against a side channel: accepted (no padding is sent);
    vLLM's continuous_usage_stats (usage in every chunk) is refused with what to do instead."""
    r = parse_chat_request(req(stream=True, stream_options={"include_usage": True, "include_obfuscation": True}))
    assert r.stream_options is not None and r.stream_options.include_usage
    assert parse_chat_request(req(stream=True, stream_options={"continuous_usage_stats": False})).stream
    with pytest.raises(ApiError) as ei:
        parse_chat_request(req(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert "continuous_usage_stats is not supported" in ei.value.message and "include_usage" in ei.value.message
    assert ei.value.param == "stream_options.continuous_usage_stats"


def test_conversion_numbers_images_across_turns() -> None:
    r = parse_chat_request(req(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                                     {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image_url", "image_url": "http://x/y"}]},
    ], stop="END", max_completion_tokens=5))
    msgs, urls = r.to_model_messages()
    assert urls == ["data:image/png;base64,AA", "http://x/y"]
    assert msgs[1]["content"] == [{"type": "image"}, {"type": "text", "text": "what?"}]
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert r.stop == ["END"] and r.completion_limit() == 5


def policy(**kw) -> FetchPolicy:
    args = dict(max_bytes=10_000, timeout_s=2.0, fetch_allow=[])
    args.update(kw)
    return FetchPolicy.from_config(**args)


def load(url: str, pol: FetchPolicy | None = None) -> bytes:
    return asyncio.run(load_image_bytes(url, pol or policy()))


def test_data_urls() -> None:
    assert load("data:image/png;base64," + base64.b64encode(PNG).decode()) == PNG
    # Base64 broken into lines, as the `base64` tool writes it by default, is the same image.
    assert load("data:image/png;base64," + base64.encodebytes(PNG * 3).decode()) == PNG * 3
    with pytest.raises(ApiError, match="only A-Z, a-z, 0-9"):
        load("data:image/png;base64,iVBO Rw0K@@")
    for url, code in [("data:text/plain;base64,QUJD", 400), ("data:image/png;base64,@@@", 400),
                      ("data:image/png;base64", 400), ("data:image/png;base64," + "A" * 20_000, 413)]:
        with pytest.raises(ApiError) as ei:
            load(url)
        assert ei.value.status == code, url


def test_an_image_just_under_the_limit_sent_as_wrapped_base64_is_not_refused_as_too_large() -> None:
    """The size check before decoding counted the line breaks of wrapped base64 as data (1.3% more): a 9,990-byte
    image under a 10,000-byte limit got a 413 saying it was larger than the limit."""
    image = bytes(range(256)) * 39 + b"\0" * 6  # 9,990 bytes
    assert load("data:image/png;base64," + base64.encodebytes(image).decode(), policy(max_bytes=10_000)) == image
    with pytest.raises(ApiError) as ei:  # one over the limit is still refused
        load("data:image/png;base64," + base64.encodebytes(image + b"\0" * 11).decode(), policy(max_bytes=10_000))
    assert ei.value.status == 413


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://localhost/x.png", "https://10.1.2.3/x.png", "http://192.168.0.7/x.png",
    "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png", "http://[::ffff:127.0.0.1]/x.png",
    "http://100.64.0.1/x.png", "http://0.0.0.0/x.png", "http://[fd00:ec2::254]/x.png",
])
def test_non_public_addresses_are_refused_before_connecting(url: str) -> None:
    with pytest.raises(ApiError) as ei:
        load(url)
    assert ei.value.status == 400 and "non-public" in ei.value.message


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://x", "javascript:alert(1)",
                                 "/relative/path.png", "http://user:pw@example.com/a.png"])
def test_bad_schemes_are_refused(url: str) -> None:
    with pytest.raises(ApiError) as ei:
        load(url)
    assert ei.value.status == 400


@pytest.mark.parametrize("url", ["http://[::1/x.png", "https://[zz]/a.png"])
def test_a_malformed_image_url_is_the_clients_error_not_a_server_error(url: str) -> None:
    with pytest.raises(ApiError) as ei:
        load(url)
    assert ei.value.status == 400 and "malformed" in ei.value.message and ei.value.code == "invalid_image_url"


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/a\x01.png", "http://127.0.0.1:9/" + "a" * 70_000])
def test_an_image_url_httpx_cannot_send_is_a_400_before_any_connection(url: str) -> None:
    """A control character or a URL over 64 KiB passed every check and crashed the GET (500)."""
    with pytest.raises(ApiError) as ei:
        load(url, policy(fetch_allow=["127.0.0.1"]))
    assert ei.value.status == 400 and "malformed" in ei.value.message and ei.value.code == "invalid_image_url"


def test_public_address_classification() -> None:
    assert is_public_address(ipaddress.ip_address("8.8.8.8"))
    assert not is_public_address(ipaddress.ip_address("172.16.0.1"))
    assert not is_public_address(ipaddress.ip_address("224.0.0.1"))


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        if self.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 50_000)
        elif self.path == "/slow":
            time.sleep(1.5)
            self.send_response(200)
            self.end_headers()
        elif self.path == "/redirect-private":
            self.send_response(302)
            self.send_header("Location", "http://10.9.9.9/img.png")
            self.end_headers()
        elif self.path == "/redirect-ok":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_fetch_from_allow_listed_local_server(server: str) -> None:
    allowed = policy(fetch_allow=["127.0.0.1/32"])
    assert load(server + "/img.png", allowed) == PNG
    assert load(server + "/redirect-ok", allowed) == PNG
    with pytest.raises(ApiError, match="non-public"):
        load(server + "/img.png")  # not allow-listed
    with pytest.raises(ApiError, match="non-public"):
        load(server + "/redirect-private", allowed)  # each redirect hop is checked
    with pytest.raises(ApiError) as ei:
        load(server + "/big", allowed)
    assert ei.value.status == 413
    with pytest.raises(ApiError, match="longer than"):
        load(server + "/slow", policy(fetch_allow=["127.0.0.1"], timeout_s=0.3))
    with pytest.raises(ApiError, match="HTTP 404"):
        load(server + "/missing", allowed)
    assert load(server.replace("127.0.0.1", "localhost") + "/img.png", policy(fetch_allow=["localhost"])) == PNG


def test_api_keys() -> None:
    ApiKeyAuth([]).check(None)
    auth = ApiKeyAuth(["k1", "k2"])
    auth.check("Bearer k2")
    for header in [None, "Bearer nope", "Basic k1", "k1"]:
        with pytest.raises(ApiError) as ei:
            auth.check(header)
        assert ei.value.status == 401 and ei.value.body()["error"]["type"] == "authentication_error"


def test_a_chunked_body_over_the_limit_is_refused_without_reading_the_rest() -> None:
    from dotsvlm_serving.api.body import read_limited

    read = 0

    async def endless():  # a chunked upload with no Content-Length, as long as the client likes
        nonlocal read
        while True:
            read += 1
            yield b"x" * 1000

    with pytest.raises(ApiError) as ei:
        asyncio.run(read_limited(endless(), 10_000))
    assert ei.value.status == 413 and "over the 10000-byte limit" in ei.value.message
    assert ei.value.code == "body_too_large"  # (an image over its limit says image_too_large)
    assert read == 11  # stopped at the chunk that passed the limit

    async def two():
        yield b'{"a": '
        yield b"1}"

    assert asyncio.run(read_limited(two(), 100)) == b'{"a": 1}'


def test_a_wrong_method_gets_405_with_the_allowed_methods() -> None:
    """HTTP's 405 names the allowed methods in an Allow header; the message says which method to use."""
    from starlette.testclient import TestClient

    from dotsvlm_serving.deployments.ingress import app

    r = TestClient(app).get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers.get("allow") == "POST", r.headers
    err = r.json()["error"]
    assert "GET" in err["message"] and "use POST" in err["message"], err


def test_retrieving_the_served_model_by_id() -> None:
    """The OpenAI client's models.retrieve(id) asks GET /v1/models/{id}: the served model, or a 404 naming it."""
    from types import SimpleNamespace

    from dotsvlm_serving.deployments.ingress import Ingress

    ing = object.__new__(Ingress)
    ing.auth, ing.created = ApiKeyAuth([]), 1700000000
    ing.model = SimpleNamespace(served_model_name="dots.vlm1")
    ing.cfg = SimpleNamespace(context_length=4096)
    request = SimpleNamespace(headers={})
    r = asyncio.run(ing.model_info("dots.vlm1", request))
    # max_model_len and root as vLLM's server lists them (its clients and benchmarks size prompts by it)
    assert json.loads(r.body) == {"id": "dots.vlm1", "object": "model", "created": 1700000000, "owned_by": "dotsvlm",
                                  "root": "dots.vlm1", "max_model_len": 4096}
    assert json.loads(asyncio.run(ing.models(request)).body)["data"] == [json.loads(r.body)]
    with pytest.raises(ApiError) as ei:
        asyncio.run(ing.model_info("gpt-4o", request))
    assert ei.value.status == 404 and ei.value.code == "model_not_found" and "'dots.vlm1'" in ei.value.message
    with pytest.raises(ApiError) as ei:
        asyncio.run(Ingress.model_info(SimpleNamespace(auth=ApiKeyAuth(["k"])), "dots.vlm1", request))
    assert ei.value.status == 401


@pytest.mark.parametrize("parse, body, fragment", [
    # A field that takes a string or a list: the message names both, not only the list.
    (parse_chat_request, req(stop=5), "stop: stop must be a string or a list of up to 4 strings"),
    (parse_completion_request, completion(prompt=5), "prompt: prompt must be a string or a list of token ids"),
    (parse_chat_request, req(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]),
     'image_url must be an object {"url": ...} (or the URL as a string)'),
    # A body for the other endpoint: say which one it is for.
    (parse_chat_request, json.dumps({"model": "dots.vlm1", "prompt": "hi"}).encode(),
     "messages: Field required (a body with prompt is for POST /v1/completions)"),
    (parse_completion_request, json.dumps({"model": "dots.vlm1", "messages": [{"role": "user", "content": "x"}]}).encode(),
     "prompt: Field required (a body with messages is for POST /v1/chat/completions)"),
])
def test_type_errors_say_what_the_field_takes_and_which_endpoint_a_body_is_for(parse, body: bytes, fragment: str) -> None:
    with pytest.raises(ApiError) as ei:
        parse(body)
    assert ei.value.status == 400 and fragment in ei.value.message, ei.value.message


def test_a_system_message_after_the_first_is_refused_before_any_image_is_fetched() -> None:
    """The model's chat template has one system prompt, at the start. A later system or developer message was
    refused only after the request's images were downloaded and probed; now the request's validation says so."""
    body = req(messages=[{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.example/a.png"}}]},
                         {"role": "developer", "content": "and polite"}, {"role": "user", "content": "go"}])
    with pytest.raises(ApiError) as ei:
        parse_chat_request(body)
    assert ei.value.status == 400 and ei.value.param == "messages[2]", ei.value.message
    assert "only the first message may be a system (or developer) message" in ei.value.message
    assert "merge" in ei.value.message


def test_an_address_that_does_not_connect_falls_back_to_the_hosts_next_one(server: str, monkeypatch) -> None:
    """A host resolving to IPv6 first, from a pod with no IPv6 route: before, only the first address was tried
    and the image failed although its IPv4 address served."""
    from dotsvlm_serving.api import images

    async def v6_first(host: str, port: int):
        return [ipaddress.ip_address("::1"), ipaddress.ip_address("127.0.0.1")]  # the server listens on IPv4 only
    monkeypatch.setattr(images, "resolve", v6_first)
    url = server.replace("127.0.0.1", "localhost") + "/img.png"
    assert load(url, policy(fetch_allow=["localhost"])) == PNG

    async def nowhere(host: str, port: int):
        return [ipaddress.ip_address("::1")]
    monkeypatch.setattr(images, "resolve", nowhere)
    with pytest.raises(ApiError) as ei:
        load(url, policy(fetch_allow=["localhost"]))
    assert ei.value.status == 400 and "could not connect to 'localhost' at any of its addresses: ::1" in ei.value.message


def test_without_max_tokens_the_default_completion_fits_a_kv_cache_smaller_than_the_context() -> None:
    """llm.kv_cache_tokens below llm.context_length: a request that sent no max_tokens gets the completion that
    fits (it was refused with "lower max_tokens"); one that asks for more than fits is still refused."""
    from types import SimpleNamespace

    from dotsvlm_serving.deployments.ingress import Ingress

    ing = object.__new__(Ingress)
    ing.cfg = SimpleNamespace(context_length=4096, kv_cache_tokens=1000, max_new_tokens_default=256)
    assert ing._sampling(parse_chat_request(req()), 900)["max_tokens"] == 100
    assert ing._sampling(parse_chat_request(req()), 10)["max_tokens"] == 256
    with pytest.raises(ApiError) as ei:
        ing._sampling(parse_chat_request(req(max_tokens=200)), 900)
    assert ei.value.status == 400 and ei.value.code == "context_length_exceeded" and "1100" in ei.value.message


def test_a_client_gone_while_its_body_arrives_is_counted_499_not_a_server_error() -> None:
    """A client that drops its upload midway (Starlette's ClientDisconnect from the body's stream) was answered
    and counted as a 500 with a logged traceback: DotsVLMHighErrorRate counts 5xx. It is a 499, as a client
    gone later is, and the image bytes it held are released."""
    from types import SimpleNamespace

    from starlette.requests import ClientDisconnect

    from dotsvlm_serving.deployments.backpressure import IngressAdmission
    from dotsvlm_serving.deployments.ingress import Ingress
    from dotsvlm_serving.serve_config import ServeAppConfig

    cfg = ServeAppConfig.model_validate({"model_path": "/m", "api": {"api_keys_env": None}}).ingress_config()
    ing = object.__new__(Ingress)
    ing.cfg, ing.admission, ing.auth = cfg, IngressAdmission(cfg), ApiKeyAuth([])
    counted: list[dict] = []
    ing.metrics = SimpleNamespace(inc=lambda name, *a, **k: counted.append({"name": name, **k}))
    ing._in_flight = ing._open = 0
    ing._draining_head = lambda: None

    async def stream():
        yield b'{"model": "dots.vlm1", "messages": [{"role": "user", "content": [{"type": "image_url", "image_'
        raise ClientDisconnect()

    request = SimpleNamespace(headers={"content-length": "5000000"}, stream=stream)
    response = asyncio.run(ing._counted(ing._chat, request))
    assert response.status_code == 499
    assert [c["code"] for c in counted if c["name"] == "dotsvlm_requests"] == ["499"]
    assert ing.admission.bytes.held == 0 and ing._in_flight == 0 and ing._open == 0


def test_an_image_url_with_an_internationalised_host_name_is_fetched(server: str, monkeypatch) -> None:
    """http://例え.jp/... resolved, then the GET failed with a 500 (its Host header could not be encoded): the Host
    header and TLS SNI now carry the name's IDNA form, the one the resolver looked up."""
    from dotsvlm_serving.api import images

    async def local(host: str, port: int):
        return [ipaddress.ip_address("127.0.0.1")]
    monkeypatch.setattr(images, "resolve", local)
    url = server.replace("127.0.0.1", "例え.jp") + "/img.png"
    assert load(url, policy(fetch_allow=["127.0.0.1"])) == PNG
    assert images._ascii_hostport("例え.jp:8080") == "xn--r8jz45g.jp:8080"
    with pytest.raises(ApiError) as ei:  # a label over 63 characters
        load("http://" + "é" * 70 + ".example/x.png", policy(fetch_allow=["127.0.0.1"]))
    assert ei.value.status == 400


@pytest.mark.parametrize("field, raw", [("temperature", "NaN"), ("temperature", "Infinity"), ("top_p", "NaN"),
                                        ("top_p", "-Infinity"), ("presence_penalty", "NaN"), ("temperature", "1e999")])
def test_nan_and_infinite_sampling_values_get_a_400_that_says_finite(field: str, raw: str) -> None:
    """JSON's NaN/Infinity extensions reached the range check and got "less than or equal to 2", which a
    client cannot act on (NaN is not greater than 2 either); the message now says what to send."""
    for parse, body in ((parse_chat_request, req()), (parse_completion_request, completion())):
        text = body.decode()[:-1] + f', "{field}": {raw}}}'
        with pytest.raises(ApiError) as ei:
            parse(text.encode())
        assert ei.value.status == 400 and ei.value.body()["error"]["param"] == field
        assert ei.value.message.startswith(f"{field}: must be a finite number"), ei.value.message


def test_max_tokens_null_means_the_endpoints_default() -> None:
    """docs/serving.md: null for an optional field means its default. /v1/completions with max_tokens null
    got llm.max_new_tokens_default (256) instead of the endpoint's 16; chat's null is its own default (none)."""
    assert parse_completion_request(completion(max_tokens=None)).completion_limit() == 16
    assert parse_completion_request(completion()).completion_limit() == 16
    assert parse_chat_request(req(max_tokens=None)).completion_limit() is None
    assert parse_chat_request(req(max_tokens=None, max_completion_tokens=7)).completion_limit() == 7


@pytest.mark.parametrize("wrap, eol", [(76, "\n"), (64, "\r\n")])
def test_the_default_body_limit_takes_the_maximum_images_base64_wrapped_with_escaped_slashes(wrap, eol) -> None:
    """Each image within api.images.max_image_bytes, the most images a request may have: the body fits,
    also when the client wraps base64 in lines (JSON escapes each line break) and escapes "/" as "\\/"
    (PHP's json_encode, some Java encoders). With room for plain base64 only, such a body got a 413."""
    import random

    from dotsvlm_serving.api.body import read_limited
    from dotsvlm_serving.serve_config import ApiConfig, ImageLimits

    api = ApiConfig(images=ImageLimits(max_images_per_request=8, max_image_bytes=4 * 1024 * 1024))
    image = random.Random(0).randbytes(api.images.max_image_bytes)
    b64 = base64.b64encode(image).decode()
    b64 = eol.join(b64[i:i + wrap] for i in range(0, len(b64), wrap)) + eol
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}}
    body = req(messages=[{"role": "user", "content": [{"type": "text", "text": "Compare these."}] + [part] * 8}])
    body = body.replace(b"/", b"\\/")
    assert len(body) > api.images.max_images_per_request * len(image) * 4 // 3 + 1024 * 1024  # the old limit

    async def chunks():
        for i in range(0, len(body), 1 << 20):
            yield body[i:i + (1 << 20)]

    assert asyncio.run(read_limited(chunks(), api.body_limit())) == body
