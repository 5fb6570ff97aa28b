"""The OpenAI chat-completions and (text) completions request and response shapes, and their validation.

Chat requests are validated here (pydantic) and turned into the model package's message format
(`{"role", "content": str | [{"type": "text"} | {"type": "image"}]}`) plus the list of image URLs in
order of appearance; completions requests carry one text prompt, used as it is (no chat template).
Unknown top-level fields are ignored (clients send many); fields that would silently change the meaning
of a request and that this server does not implement are refused. Both kinds share the sampling fields
and their checks (`GenerationRequest`). Parse with the deployment's engine name as context
(`parse_chat_request(body, engine=...)`), so a refusal can say which engine it is about.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .errors import ApiError

_R = TypeVar("_R", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _accept_bare_string(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None

    @model_validator(mode="after")
    def _check(self) -> "ChatMessage":
        if self.content is None:
            raise ValueError("content is required (a string or a list of content parts)")
        if isinstance(self.content, list):
            if not self.content:
                raise ValueError("content must not be an empty list")
            if self.role != "user" and any(isinstance(p, ImagePart) for p in self.content):
                raise ValueError(f"images are only accepted in user messages, not in a {self.role} message")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False
    # OpenAI's: random padding in each chunk against a length side channel. Accepted; no padding is sent.
    include_obfuscation: bool | None = None
    # vLLM's: usage in every chunk. Not implemented: the answer's events do not carry a running token count.
    continuous_usage_stats: bool | None = None

    @field_validator("include_usage", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any) -> Any:
        return False if v is None else v

    @model_validator(mode="after")
    def _refuse_continuous_usage(self) -> "StreamOptions":
        if self.continuous_usage_stats:
            raise unsupported("stream_options.continuous_usage_stats is not supported by this server: remove it; "
                              "stream_options.include_usage gives the usage in a last chunk",
                              "stream_options.continuous_usage_stats")
        return self


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # json_schema carries its own fields
    type: Literal["text", "json_object", "json_schema"]


def unsupported(message: str, param: str) -> ApiError:
    """The 400 for a request field this server does not honour, naming it as OpenAI does (`param`, and
    `code: unsupported_parameter`). Raised from the models' validators: pydantic passes it through as it is."""
    return ApiError(400, message, param=param, code="unsupported_parameter")


# Request fields (OpenAI's, and the extensions vLLM's and SGLang's servers take) that this server cannot
# honour yet, with the value that means "not used": a request that sets one to anything else gets a 400
# naming it rather than an answer that silently ignores it. Unknown fields not listed here are ignored
# (e.g. "user", "metadata", "store").
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "echo": (None, False),
    "min_tokens": (None, 0),
    "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "use_beam_search": (None, False),
    "prompt_logprobs": (None, 0),
    "regex": (None,),
    "ebnf": (None,),
    "json_schema": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "continue_final_message": (None, False),
    "skip_special_tokens": (None, True),
    "suffix": (None, ""),
    # vLLM's and SGLang's sampling and decoding extensions (sent through the OpenAI client's extra_body).
    "stop_token_ids": (None, []),
    "include_stop_str_in_output": (None, False),
    "no_stop_trim": (None, False),
    "bad_words": (None, []),
    "allowed_token_ids": (None, []),
    "logits_processors": (None, []),
    "length_penalty": (None, 1, 1.0),
    "truncate_prompt_tokens": (None,),
    "return_tokens_as_token_ids": (None, False),
    "spaces_between_special_tokens": (None, True),
    # Function calling by its older names, and a tool choice without tools ("none" and "auto" choose nothing).
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "tool_choice": (None, "none", "auto"),
}

# The same for the chat endpoint only (vLLM's chat-template options; a text completion has no template).
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple[Any, ...]] = {
    "add_generation_prompt": (None, True),
    "chat_template": (None,),
}

# OpenAI's API takes null for these optional fields as "the default" (so does vLLM's server).
_NULL_IS_DEFAULT = {"stream": False, "n": 1, "ignore_eos": False}


class GenerationRequest(BaseModel):
    """The fields chat and completions requests share: model, sampling, limits, streaming."""

    # NaN and infinities (JSON extensions Python's and pydantic's parsers take) are refused as such: with
    # them allowed, `temperature: NaN` failed the range check with "less than or equal to 2".
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="extension: 0 or -1 disables")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="a 64-bit signed integer")
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-sequence tokens")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    tools: list[Any] | None = None
    response_format: ResponseFormat | None = None

    unsupported_fields: ClassVar[dict[str, tuple[Any, ...]]] = UNSUPPORTED_FIELDS

    @model_validator(mode="before")
    @classmethod
    def _refuse_unhonoured(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, neutral in cls.unsupported_fields.items():
                if name in data and data[name] not in neutral:
                    raise unsupported(f"{name} is not supported by this server; remove it from the request", name)
            nulls = [k for k in _NULL_IS_DEFAULT if k in data and data[k] is None]
            if nulls:
                data = {**data, **{k: _NULL_IS_DEFAULT[k] for k in nulls}}
            if data.get("max_tokens", 0) is None:  # as if absent: the endpoint's default (16 for completions)
                data = {k: v for k, v in data.items() if k != "max_tokens"}
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops

    @model_validator(mode="after")
    def _shared_unsupported(self, info: ValidationInfo) -> "GenerationRequest":
        engine = _engine_of(info)
        if self.n != 1:
            raise unsupported(f"n > 1 is not supported by this server{engine}: send one request per completion "
                              "(with different seeds for different samples)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if (getattr(self, name) or 0) != 0:
                raise unsupported("presence_penalty and frequency_penalty are not supported; leave them at 0", name)
        if self.response_format is not None and self.response_format.type != "text":
            raise unsupported(f"response_format {self.response_format.type} (structured output) is not supported by "
                              f"this server yet: remove response_format, or ask for JSON in the prompt and "
                              f"validate the answer yourself", "response_format")
        if self.tools:
            raise unsupported("tools / function calling are not supported by this server", "tools")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        return self

    def completion_limit(self) -> int | None:
        return self.max_tokens


def _engine_of(info: ValidationInfo) -> str:
    """' (llm.engine vllm)' when the caller passed the deployment's engine as validation context."""
    engine = (info.context or {}).get("engine") if isinstance(info.context, dict) else None
    return f" (llm.engine {engine})" if engine else ""


class ChatCompletionRequest(GenerationRequest):
    unsupported_fields: ClassVar[dict[str, tuple[Any, ...]]] = {**UNSUPPORTED_FIELDS, **UNSUPPORTED_CHAT_FIELDS}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None

    @model_validator(mode="after")
    def _unsupported(self, info: ValidationInfo) -> "ChatCompletionRequest":
        if self.logprobs:
            raise unsupported(f"logprobs are not supported by this server{_engine_of(info)}; remove logprobs or set "
                              "it to false", "logprobs")
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be an assistant message (continuation is not supported)")
        late = next((i for i, m in enumerate(self.messages) if i and m.role in ("system", "developer")), None)
        if late is not None:  # the chat template has one system prompt (model.prompt.render_chat)
            raise ApiError(400, f"messages[{late}] is a {self.messages[late].role} message: only the first message may "
                                f"be a system (or developer) message in this model's chat template; merge it into "
                                f"messages[0]", param=f"messages[{late}]")
        return self

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_model_messages(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Messages in the model package's format and the image URLs in order of appearance."""
        out: list[dict[str, Any]] = []
        urls: list[str] = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role
            if isinstance(m.content, str):
                out.append({"role": role, "content": m.content})
                continue
            parts: list[dict[str, Any]] = []
            for p in m.content or []:
                if isinstance(p, TextPart):
                    parts.append({"type": "text", "text": p.text})
                else:
                    parts.append({"type": "image"})
                    urls.append(p.image_url.url)
            out.append({"role": role, "content": parts})
        return out, urls


# OpenAI's default max_tokens for /v1/completions (vLLM's server has the same); chat has none.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class CompletionRequest(GenerationRequest):
    """/v1/completions: one text prompt, continued as it is (no chat template, no images)."""

    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        """OpenAI's prompt is a string, a token-id list, or a batch of either: one prompt per request here."""
        if isinstance(v, list) and v and all(isinstance(x, (str, list)) for x in v):
            if len(v) > 1:
                raise ValueError(f"a batch of {len(v)} prompts is not supported: send one request per prompt")
            v = v[0]
        if v == "" or v == []:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError("prompt must be a string or a list of token ids (integers)")
        return v

    @model_validator(mode="after")
    def _unsupported(self, info: ValidationInfo) -> "CompletionRequest":
        if self.logprobs is not None:
            raise unsupported(f"logprobs are not supported by this server{_engine_of(info)}; remove logprobs",
                              "logprobs")
        return self


_TAGS = frozenset({"text", "image_url"})


def _loc(loc: tuple[Any, ...]) -> str:
    """`messages[0].content[1].image_url` from pydantic's location (union branch names removed)."""
    out = ""
    for i, x in enumerate(loc):
        if isinstance(x, int):
            out += f"[{x}]"
            continue
        if x == "str" or x.startswith(("list[", "function-", "tagged-union")):
            continue
        if x in _TAGS and i > 0 and isinstance(loc[i - 1], int) and i + 1 < len(loc):
            continue  # the discriminator tag, followed by the real field name
        out += ("." if out else "") + x
    return out


def _describe(errs: list[dict[str, Any]]) -> tuple[str, str]:
    # A union (str | list of parts) reports one error per branch: prefer the branch that got furthest.
    cands = [e for e in errs if not (e["loc"] and e["loc"][-1] == "str")] or errs
    first = max(cands, key=lambda e: len(e["loc"]))
    where = _loc(tuple(first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "list_type" and where.endswith("content"):
        msg = "content must be a string or a list of content parts ({\"type\": \"text\"} or {\"type\": \"image_url\"})"
    elif first["type"] in ("list_type", "model_type", "dict_type", "string_type"):
        # A field that takes a string or a list (or an object): name what it takes, not only one branch.
        field = where.rsplit(".", 1)[-1]
        if field in _EITHER:
            msg = f"{field} must be {_EITHER[field]}"
    elif first["type"] == "finite_number":
        msg = f"must be a finite number, not {first.get('input')}"
    elif first["type"] == "missing" and where in _OTHER_ENDPOINT and isinstance(first.get("input"), dict):
        other, endpoint = _OTHER_ENDPOINT[where]
        if other in first["input"]:
            msg += f" (a body with {other} is for POST {endpoint})"
    return where, msg


# What a field that takes one of several shapes takes, for its type errors.
_EITHER = {"stop": "a string or a list of up to 4 strings",
           "prompt": "a string or a list of token ids (integers)",
           "image_url": 'an object {"url": ...} (or the URL as a string)'}
# A body missing its endpoint's field but holding the other endpoint's: sent to the wrong endpoint.
_OTHER_ENDPOINT = {"messages": ("prompt", "/v1/completions"), "prompt": ("messages", "/v1/chat/completions")}


def parse_chat_request(body: bytes, *, engine: str | None = None) -> ChatCompletionRequest:
    """Validate a chat request body; raise a 400 `ApiError` that names the offending field."""
    return _parse(ChatCompletionRequest, body, "chat-completions", engine)


def parse_completion_request(body: bytes, *, engine: str | None = None) -> CompletionRequest:
    """Validate a /v1/completions request body; raise a 400 `ApiError` that names the offending field."""
    return _parse(CompletionRequest, body, "completions", engine)


def _parse(model: type[_R], body: bytes, what: str, engine: str | None) -> _R:
    if not body:
        raise ApiError(400, f"the request body is empty; send a JSON {what} request")
    try:
        return model.model_validate_json(body, context={"engine": engine})
    except ValidationError as exc:
        errs = exc.errors(include_url=False)
        if errs and errs[0]["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {errs[0]['msg']}") from None
        if errs and errs[0]["type"] == "model_type" and not errs[0]["loc"]:
            raise ApiError(400, "the request body must be a JSON object") from None
        where, msg = _describe(errs)
        raise ApiError(400, f"{where + ': ' if where else ''}{msg}", param=where or None) from None


# ------------------------------------------------------------------------------------------ responses

def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def new_text_completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex


def completion_response(cid: str, model: str, text: str, finish_reason: str, usage: dict[str, int],
                        created: int | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": _usage(usage)}


def chunk(cid: str, model: str, created: int, *, delta: dict[str, Any] | None = None,
          finish_reason: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}]
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": choices}
    if usage is not None:
        out["usage"] = _usage(usage)
    return out


def text_completion_response(cid: str, model: str, text: str, finish_reason: str, usage: dict[str, int],
                             created: int | None = None) -> dict[str, Any]:
    """The body of a /v1/completions answer (object text_completion)."""
    return {"id": cid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
            "usage": _usage(usage)}


def text_completion_chunk(cid: str, model: str, created: int, *, text: str | None = None,
                          finish_reason: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One server-sent event of a streamed /v1/completions answer (the usage-only chunk has no choices)."""
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]
    out: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model,
                           "choices": choices}
    if usage is not None:
        out["usage"] = _usage(usage)
    return out


def _usage(u: dict[str, int]) -> dict[str, int]:
    p, c = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def models_response(name: str, created: int, max_model_len: int) -> dict[str, Any]:
    """GET /v1/models; `root` and `max_model_len` (the context: prompt + completion) as vLLM's server lists them."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "dotsvlm",
                                        "root": name, "max_model_len": max_model_len}]}
