"""The ingress's SSE stream: text that arrived in one answer of the tensor queue goes out as one chunk,
and the stream always ends with the finish (or error) chunk and [DONE]."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from dotsvlm_serving.api.errors import ApiError
from dotsvlm_serving.deployments.ingress import Ingress


def _ingress() -> Ingress:
    ing = object.__new__(Ingress)
    ing.model = SimpleNamespace(served_model_name="dots-test")
    ing._observe_first_token = lambda t0, n: 0.0  # type: ignore[method-assign]
    ing.finished = []
    ing._observe_finish = lambda ev, *a: ing.finished.append(ev)  # type: ignore[method-assign]
    return ing


def tok(text: str) -> dict:
    return {"request_id": "r", "type": "token", "text": text}


def finish(text: str = "") -> dict:
    return {"request_id": "r", "type": "finish", "finish_reason": "stop", "text": text,
            "usage": {"prompt_tokens": 3, "completion_tokens": 4}}


async def _batches(*batches: list[dict]) -> AsyncIterator[list[dict]]:
    for b in batches:
        yield b


def _stream(ing: Ingress, *batches: list[dict], shape: str = "chat", usage: bool = False) -> list[dict | str]:
    req = SimpleNamespace(stream_options=SimpleNamespace(include_usage=usage))

    async def go() -> list[bytes]:
        resp = await ing._stream(shape, "cid", req, _batches(*batches), 0.0, 0)
        return [part async for part in resp.body_iterator]

    out: list[dict | str] = []
    for part in asyncio.run(go()):
        for line in part.decode().split("\n\n"):
            if line:
                data = line.removeprefix("data: ")
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _texts(chunks: list[dict | str], shape: str = "chat") -> list[str | None]:
    if shape == "text":
        return [c["choices"][0]["text"] for c in chunks if isinstance(c, dict) and c.get("choices")]
    return [c["choices"][0]["delta"].get("content") for c in chunks if isinstance(c, dict) and c.get("choices")]


def test_one_chunk_per_batch_of_events_in_order() -> None:
    ing = _ingress()
    chunks = _stream(ing, [tok("He")], [tok("l"), tok("lo"), tok("")], [tok(" wor"), finish("ld")])
    assert _texts(chunks) == ["", "He", "llo", " world", None]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1] == "[DONE]"
    assert len(ing.finished) == 1


def test_text_completions_and_usage_chunk() -> None:
    chunks = _stream(_ingress(), [tok("a"), tok("b")], [finish()], shape="text", usage=True)
    assert _texts(chunks, "text") == ["ab", ""]
    assert chunks[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert chunks[-1] == "[DONE]"


def test_an_error_after_text_flushes_the_text_then_the_error() -> None:
    err = {"request_id": "r", "type": "error", "code": 503, "message": "the LLM replica was lost"}
    chunks = _stream(_ingress(), [tok("a")], [tok("b"), err])
    assert _texts(chunks) == ["", "a", "b"]
    assert chunks[-2]["error"]["message"] == "the LLM replica was lost"
    assert chunks[-1] == "[DONE]"


def test_an_error_before_any_text_is_an_http_error() -> None:
    err = {"request_id": "r", "type": "error", "code": 429, "message": "busy"}
    with pytest.raises(ApiError) as caught:
        _stream(_ingress(), [err])
    assert caught.value.status == 429


def test_a_stream_that_ends_without_a_result_says_so() -> None:
    chunks = _stream(_ingress(), [tok("a")])
    assert _texts(chunks) == ["", "a"]
    assert "retry" in chunks[-2]["error"]["message"]
