"""Ingress: the OpenAI-compatible HTTP API.

Per request: authenticate, validate, load images and read their headers (the vision replicas decode
them, so this event loop stays free for other requests), render the chat template and tokenise,
check limits, hand the request to the relay (`relay.py`: VisionEncoder, then the tensor queue, 429
with Retry-After when it stays full), then turn the LLM replica's events into one JSON answer or
server-sent events. A client that goes away cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import head_drain, pipeline
from ..autoscaling import serve_policy
from ..autoscaling.signals import NO_DATA, VISION_PENDING_IMAGES, VISION_PENDING_PIXELS, IngressSignals
from ..api.auth import ApiKeyAuth
from ..api.body import read_limited, too_large
from ..api.errors import ApiError, error_body
from ..api.images import FetchPolicy, decode_data_url, load_image_bytes
from ..api.openai_models import (CompletionRequest, GenerationRequest, chunk, completion_response, models_response,
                                 new_completion_id, new_text_completion_id, parse_chat_request,
                                 parse_completion_request, text_completion_chunk, text_completion_response)
from ..events import ErrorEvent, EventBatch, FinishEvent
from ..metrics.catalog import CLIENT_CLOSED, NO_MODALITY
from ..metrics.publish import ReplicaMetrics, StatsPublisher
from ..model.config import load_config
from ..model.preprocess import ImageError, probe_image
from ..model.prompt import check_image_token, load_tokenizer
from ..serve_config import INGRESS_DEPLOYMENT, AutoscalingPolicyConfig, IngressConfig, ServedModel
from .backpressure import IngressAdmission, ReportAges, read_reports, sum_reports, worst_p90s
from .relay import Relay

log = logging.getLogger("ray.serve")

# Bodies over this size carry images (a chat's text is far smaller): they are read off the event loop
# and count against the image bytes the replica may hold.
LARGE_BODY = 65536
TOKENIZE_OFF_LOOP_CHARS = 65536  # text longer than this is tokenized in a thread
# The longest a stopping replica waits to delete its backpressure report (the GCS may not answer).
REPORT_WITHDRAW_TIMEOUT_S = 5.0

app = FastAPI(title="dotsvlm", docs_url=None, redoc_url=None)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})  # a 405's Allow header among them
    allowed = headers.get("Allow") or headers.get("allow")
    msg = {404: "no such endpoint: use /v1/chat/completions, /v1/completions, /v1/models or /health (metrics "
                "are on each Ray node's metrics port, not on the API)",
           405: f"method {request.method} is not allowed on {request.url.path}"
                + (f": use {allowed}" if allowed else "")}.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(exc.status_code, msg), status_code=exc.status_code, headers=headers or None)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    """Anything unforeseen still answers in the OpenAI format; Ray failures (a replica or the queue
    being replaced) are worth retrying, so they are 503."""
    log.exception("unhandled error in the ingress")
    status = 503 if isinstance(exc, ray.exceptions.RayError) else 500
    what = "a serving component is unavailable" if status == 503 else "internal error"
    return JSONResponse(error_body(status, f"{what} ({type(exc).__name__}); retry the request"), status_code=status)


class Ingress:
    """Its slice (`IngressConfig`: API limits, the vision stage's backlog limits, the LLM's token limits, the enqueue timeout) arrives
    through `reconfigure`, before the first request and whenever only the slice changes; it applies in
    place, to the requests that arrive after it."""

    _max_token_chars: int | None = None  # the vocabulary's longest token, in characters (`_check_text_fits`)

    def __init__(self, model: ServedModel, vision: Any, queue: Any, llm: Any) -> None:
        self.model = model
        self.cfg: IngressConfig | None = None  # set by reconfigure before the first request
        self.vision, self.queue, self.llm = vision, queue, llm
        self.model_config = load_config(model.model_path)
        self.tokenizer = load_tokenizer(model.model_path)
        check_image_token(self.tokenizer, self.model_config.image_token_id, model.model_path)
        self.metrics = ReplicaMetrics("ingress")
        self.signals = IngressSignals()  # what this replica reports to the autoscaler
        self.admission: IngressAdmission | None = None  # backpressure (image bytes held, vision backlog): reconfigure
        self._in_flight = 0
        # Admitted and not fully answered (a stream counts until its last byte): what a head drain waits for.
        self._open = 0
        # The head drain (`dotsvlm drain-head`) this replica follows: one that began after it started.
        self._head_drain = head_drain.FlagWatch(time.time())
        self._report_ages = ReportAges()  # which ingress replicas' reports are fresh, for `GET /-/autoscaler`
        # The gauges come from the same signals the autoscaler reads (record_autoscaling_stats).
        publisher = StatsPublisher(
            self.metrics, lambda: {**self.signals.stats(time.monotonic()), "in_flight": self._in_flight,
                                   "image_bytes": self.admission.bytes.held if self.admission else 0},
            gauges={"dotsvlm_requests_in_flight": "in_flight",
                    "dotsvlm_vision_pending_images": VISION_PENDING_IMAGES,
                    "dotsvlm_vision_pending_pixels": VISION_PENDING_PIXELS,
                    "dotsvlm_ingress_image_bytes": "image_bytes"})
        # Serve calls this constructor inside its own (async) one, so a loop is running.
        self._publishing = asyncio.get_running_loop().create_task(publisher.run_forever())
        self.relay: Relay | None = None
        self.created = int(time.time())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = IngressConfig.model_validate(user_config)
        lim = cfg.api.images
        self.fetch_policy = FetchPolicy.from_config(max_bytes=lim.max_image_bytes, timeout_s=lim.fetch_timeout_s,
                                                    fetch_allow=lim.fetch_allow)
        self.auth = ApiKeyAuth.from_env(cfg.api.api_keys_env)
        if self.relay is None:
            self.admission = IngressAdmission(cfg)
            loop = asyncio.get_running_loop()
            self._watching = loop.create_task(self.admission.watch_vision_replicas())
            self._report_key = serve.get_replica_context().replica_id.unique_id
            self._reporting = loop.create_task(self.admission.publish_forever(
                self._report_key, lambda: self.signals.pending_pixels, extra=self._report_extra))
            self._watching_drain = loop.create_task(self._watch_head_drain())
            pre = self.model_config.preprocess
            self.relay = Relay(self.vision, self.queue, self.metrics, self.signals, self.admission,
                               hidden_size=int(self.model_config.vision.hidden_size),
                               pixels_per_token=(pre.patch_size * pre.merge_size) ** 2,
                               enqueue_timeout_s=cfg.enqueue_timeout_s, request_timeout_s=cfg.api.request_timeout_s,
                               embed_dtype=self.model.dtype)
        else:
            self.admission.configure(cfg)  # type: ignore[union-attr]
            self.relay.enqueue_timeout_s = cfg.enqueue_timeout_s
            self.relay.request_timeout_s = cfg.api.request_timeout_s
        self.cfg = cfg
        if cfg.autoscaling is not None:
            await self._hand_over_policy_settings(cfg.autoscaling)
        log.info("Ingress: config applied in place (context %d tokens, KV budget %d tokens)", cfg.context_length,
                 cfg.kv_cache_tokens)

    async def _hand_over_policy_settings(self, settings: AutoscalingPolicyConfig) -> None:
        """The autoscaling policy's settings (SLO, windows, steps) reach the policy through this slice: Serve's
        controller cannot read a deployment's user_config, and the policy's own kwargs would restart every
        replica on a change (serve_config.ServeAppConfig.autoscaling_policy). A failure is logged, never
        raised: the policy keeps deciding with the settings it has."""
        try:
            await asyncio.to_thread(serve_policy.publish_settings, settings)
            log.info("Ingress: autoscaling settings handed to the policy (SLO image TTFT %g s, text TTFT %g s, "
                     "inter-token %g s)", settings.slo.image_ttft_s, settings.slo.text_ttft_s,
                     settings.slo.inter_token_s)
        except Exception:
            log.exception("Ingress: could not hand the autoscaling settings to the policy")

    async def _watch_head_drain(self, interval_s: float = 0.5) -> None:
        """Follow the head-drain flag (`head_drain.DRAIN_KV_KEY`), set by the head pod's preStop hook."""
        while True:
            try:
                self._head_drain.saw(await asyncio.to_thread(head_drain.read_flag))
            except asyncio.CancelledError:
                raise
            except Exception:  # the last known flag stays; it expires by itself
                log.warning("could not read the head-drain flag", exc_info=True)
            await asyncio.sleep(interval_s)

    async def __del__(self) -> None:
        """Serve stops this replica (a rollout, a Serve config change, its node drained; its requests are done):
        its backpressure report goes with it, so `GET /-/autoscaler` stops summing it and the next head drain
        does not wait for it (`IngressAdmission.withdraw_report`). Best effort: the GCS may be gone already."""
        admission, key = getattr(self, "admission", None), getattr(self, "_report_key", None)
        if admission is None or key is None:
            return
        try:
            await asyncio.wait_for(admission.withdraw_report(key), REPORT_WITHDRAW_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a stopping replica must not fail on this (a timeout included)
            log.warning("could not delete this ingress replica's backpressure report", exc_info=True)

    def _draining_head(self) -> head_drain.HeadDrain | None:
        return self._head_drain.current()

    def _report_extra(self) -> dict[str, Any]:
        """What `dotsvlm drain-head` reads in this replica's report: its open requests and which drain it follows
        (the flag's `since`, so the hook needs no clock to tell this drain's reports from older ones)."""
        drain = self._draining_head()
        return {"open_requests": self._open, "head_draining": drain is not None,
                "head_drain_since": None if drain is None else drain.since, "p90_s": self._p90s()}

    # ------------------------------------------------------------------------------- small endpoints
    @app.get("/health")
    async def health(self) -> JSONResponse:
        drain = self._draining_head()
        if drain is not None:
            return JSONResponse({"status": "draining", "reason": drain.message()}, 503,
                                headers={"Retry-After": str(drain.retry_after_s)})
        try:
            stats = await asyncio.wait_for(self.queue.stats.remote(), timeout=5)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "reason": f"tensor queue not reachable: {exc}"}, 503)
        if not stats["consumers"]:
            return JSONResponse({"status": "unavailable", "reason": "no LLM replica is ready yet"}, 503)
        return JSONResponse({"status": "ok", "llm_replicas": len(stats["consumers"]), "queue_depth": stats["depth"]})

    @app.get("/-/autoscaler")
    async def autoscaler(self, request: Request) -> JSONResponse:
        """The autoscaler's latest decision per pool, the tensor queue and the observed latencies per
        modality: what the operator writes into the resource's status. Behind the API keys."""
        self.auth.check(request.headers.get("authorization"))
        try:
            queue = await asyncio.wait_for(self.queue.stats.remote(), timeout=5)
        except Exception as exc:
            return JSONResponse(error_body(503, f"tensor queue not reachable: {exc}"), 503)
        counters = queue.get("counters", {})
        reports = self._report_ages.fresh(await asyncio.to_thread(read_reports))
        return JSONResponse({
            "decisions": await asyncio.to_thread(serve_policy.read_published),
            "queue": {"depth": queue["depth"], "bytes": queue["bytes"], "oldest_age_s": queue["oldest_age_s"],
                      "waiting_producers": queue["waiting_producers"], "max_items": queue["max_items"],
                      "leased": queue.get("leased", 0),  # items an LLM replica is generating now
                      "rejected_total": counters.get("rejected_full", 0),
                      "redelivered_total": counters.get("redelivered", 0)},
            # The worst ingress replica's p90s, as the policy reads them (not only this replica's).
            "slo": worst_p90s(reports, self._p90s()),
            # Backpressure before the queue, summed over the ingress replicas: the vision stage's backlog
            # against its limit, image bytes held, and the requests answered 429 by reason.
            "admission": sum_reports(reports),
        })

    def _p90s(self) -> dict[str, float | None]:
        """This replica's recent p90 latencies (None: no request of that kind lately)."""
        return {k: (None if v == NO_DATA else v) for k, v in self.signals.stats(time.monotonic()).items()
                if k.endswith("_p90_s")}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook: this replica's signals for the autoscaling policy (autoscaling/signals.py)."""
        return self.signals.stats(time.monotonic())

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self.auth.check(request.headers.get("authorization"))
        return JSONResponse(models_response(self.model.served_model_name, self.created, self.cfg.context_length))

    @app.get("/v1/models/{model_id:path}")
    async def model_info(self, model_id: str, request: Request) -> JSONResponse:
        """The OpenAI client's `models.retrieve(id)`: the served model, or 404 for another name."""
        self.auth.check(request.headers.get("authorization"))
        name = self.model.served_model_name
        if model_id != name:
            raise ApiError(404, f"the model {model_id!r} does not exist: this server serves {name!r}",
                           param="model", code="model_not_found")
        return JSONResponse(models_response(name, self.created, self.cfg.context_length)["data"][0])

    # ------------------------------------------------------------------------------- chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._counted(self._chat, request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._counted(self._completion, request)

    async def _counted(self, handler: Any, request: Request) -> Response:
        """Runs one generation endpoint with the in-flight gauge, the request counter and the refusals."""
        t0 = time.monotonic()
        self._in_flight += 1
        self._open += 1
        status = 500
        info = {"modality": NO_MODALITY}
        streaming = False
        try:
            drain = self._draining_head()
            if drain is not None:
                raise ApiError(503, drain.message(), code="head_restarting",
                               headers={"Retry-After": str(drain.retry_after_s)})
            response = await handler(request, t0, info)
            status = response.status_code
            if isinstance(response, StreamingResponse):
                # Counted when it ends, with how it ended (`_stream`'s outcome): its 200 went out with the headers,
                # but an error sent in the stream (a 503 when its LLM replica died) is what the client got.
                outcome = getattr(response, "outcome", None) or {"code": status}
                response = _ClosingStream(response, lambda: self._stream_closed(outcome["code"], info["modality"]))
                streaming = True
            return response
        except ApiError as exc:
            status = exc.status
            stage = self.admission.count(exc)
            if stage is not None:
                self.metrics.inc("dotsvlm_rejected_requests", stage=stage, reason=str(exc.code))
            raise
        except asyncio.CancelledError:
            # The client went away before the answer (Serve cancels the call): not a server error, and counted
            # as one it would page (DotsVLMHighErrorRate counts 5xx). 499, nginx's "client closed request".
            status = CLIENT_CLOSED
            raise
        except ClientDisconnect:
            # The same while its body was still arriving (a large image upload cut off): Starlette raises this
            # from the body's stream. It came out as a 500 with a logged traceback ("unhandled error").
            status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        except ray.exceptions.RayError:
            status = 503  # as `_unexpected` answers it
            raise
        finally:
            if not streaming:
                self._in_flight -= 1
                self._open -= 1
                self.metrics.inc("dotsvlm_requests", code=str(status), modality=info["modality"])

    def _stream_closed(self, code: int, modality: str) -> None:
        """A stream is no longer served: its last chunk went out, or its client left. It counts with the status
        it ended with."""
        self._in_flight -= 1
        self._open -= 1
        self.metrics.inc("dotsvlm_requests", code=str(code), modality=modality)

    def _declared_size(self, request: Request) -> str | None:
        """Authenticates, then refuses a body whose Content-Length is over the limit (413); returns it."""
        self.auth.check(request.headers.get("authorization"))
        limit = self.cfg.api.body_limit()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large(limit, declared)
        return declared

    async def _read_body(self, request: Request, t0: float) -> bytes:
        """The body, within the request's time: a client that declares a large body and sends it slowly holds
        image-byte budget (`reserve_bytes`) while it does, and enough of them would refuse every image request."""
        limit_s = self.cfg.api.request_timeout_s
        try:
            return await asyncio.wait_for(read_limited(request.stream(), self.cfg.api.body_limit()),
                                          max(0.0, t0 + limit_s - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within the request timeout ({limit_s:g} s): "
                                f"send it faster, or send a smaller body", code="body_timeout") from None

    def _check_model(self, req: GenerationRequest) -> None:
        if req.model != self.model.served_model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist: this server serves "
                                f"{self.model.served_model_name!r} (see /v1/models)", param="model",
                           code="model_not_found")

    def _reserve_declared(self, request: Request) -> int:
        """Backpressure on memory: a large body is counted against the bytes this replica may hold (the image
        bytes' budget) from before it is read (429 when they are full). Returns the bytes held (0: none)."""
        declared = self._declared_size(request)
        if declared and declared.isdigit() and int(declared) > LARGE_BODY:
            self.admission.reserve_bytes(int(declared), time.monotonic())
            return int(declared)
        return 0

    def _reserve_read(self, body: bytes, held: int) -> int:
        """The same for a large body that came without a Content-Length (a chunked upload), once it is in."""
        if not held and len(body) > LARGE_BODY:
            self.admission.reserve_bytes(len(body), time.monotonic())
            return len(body)
        return held

    async def _chat(self, request: Request, t0: float, info: dict[str, str]) -> Response:
        engine = self.cfg.engine
        # A large body (images) holds its bytes until it is parsed, then its images' own bytes until the
        # request's first token (they are kept until then to encode again if embeddings are lost).
        held = self._reserve_declared(request)
        try:
            body = await self._read_body(request, t0)
            held = self._reserve_read(body, held)
            # Parsing a large body (base64 images) is CPU work: off the event loop.
            req = (await asyncio.to_thread(parse_chat_request, body, engine=engine) if len(body) > LARGE_BODY
                   else parse_chat_request(body, engine=engine))
            del body
            self._check_model(req)
            messages, urls = req.to_model_messages()
            info["modality"] = _modality(len(urls))
            chars = self._check_text_fits(_text_chars(messages), "messages")  # before any image is fetched
            # An http(s) image is counted at its largest allowed size while it downloads (its size is known
            # only once it is in), so concurrent downloads stay within the limit too.
            self._check_image_count(urls)
            fetched = sum(1 for u in urls if not _is_data_url(u))
            if fetched:
                held = self._hold_images(held, held + fetched * self.fetch_policy.max_bytes)
            images, sizes = await self._load_images(urls)
            held = self._hold_images(held, sum(len(d) for d in images))
            counts = self._token_counts(sizes)
            try:
                # Tokenizing a long text is CPU work (seconds for megabytes): off the event loop.
                ids = (await asyncio.to_thread(pipeline.prompt_ids, self.tokenizer, self.model_config, messages, counts)
                       if chars > TOKENIZE_OFF_LOOP_CHARS else
                       pipeline.prompt_ids(self.tokenizer, self.model_config, messages, counts))
            except ValueError as exc:
                raise ApiError(400, str(exc), param="messages") from None
            params = self._sampling(req, len(ids))
            deadline = t0 + self.cfg.api.request_timeout_s
            cid = new_completion_id()
            n_images = len(images)
            events = await self.relay.submit(cid, ids, images, counts, params, req.stream, deadline)
            del images  # its first event is in: no encoding again (relay.submit), the bytes can go
        finally:
            if held:
                self.admission.bytes.release(held, time.monotonic())
        if req.stream:
            return await self._stream("chat", cid, req, events, t0, n_images)
        return await self._complete("chat", cid, events, t0, n_images)

    async def _completion(self, request: Request, t0: float, info: dict[str, str]) -> Response:
        """/v1/completions: the prompt continued as it is, text only, with the chat endpoint's limits and
        errors. A large body holds its bytes, as the chat endpoint's does, until it is parsed (a prompt is up to
        the body limit, ~200 MB by default: many at once would otherwise be held beyond any budget)."""
        held = self._reserve_declared(request)
        try:
            body = await self._read_body(request, t0)
            held = self._reserve_read(body, held)
            engine = self.cfg.engine
            req = (await asyncio.to_thread(parse_completion_request, body, engine=engine) if len(body) > LARGE_BODY
                   else parse_completion_request(body, engine=engine))
            del body
        finally:
            if held:
                self.admission.bytes.release(held, time.monotonic())
        self._check_model(req)
        info["modality"] = _modality(0)
        if isinstance(req.prompt, str):
            self._check_text_fits(len(req.prompt), "prompt")
        elif len(req.prompt) > self.cfg.context_length:
            raise self._too_long(len(req.prompt), 1, "prompt")
        ids = (await asyncio.to_thread(self._completion_prompt_ids, req)
               if isinstance(req.prompt, str) and len(req.prompt) > TOKENIZE_OFF_LOOP_CHARS
               else self._completion_prompt_ids(req))
        params = self._sampling(req, len(ids))
        cid = new_text_completion_id()
        events = await self.relay.submit(cid, ids, [], [], params, req.stream, t0 + self.cfg.api.request_timeout_s)
        if req.stream:
            return await self._stream("text", cid, req, events, t0, 0)
        return await self._complete("text", cid, events, t0, 0)

    def _completion_prompt_ids(self, req: CompletionRequest) -> list[int]:
        """The prompt's token ids (text is tokenised without special tokens added, as the chat template's
        text is); image-pad tokens are refused: a completion has no images to put there."""
        if isinstance(req.prompt, str):
            ids = list(self.tokenizer.encode(req.prompt, add_special_tokens=False))
        else:
            vocab = len(self.tokenizer)
            bad = [t for t in req.prompt if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
            ids = list(req.prompt)
        if not ids:
            raise ApiError(400, "prompt: the prompt has no tokens", param="prompt")
        if self.model_config.image_token_id in ids:
            raise ApiError(400, "prompt: the prompt contains the image-pad token <|imgpad|>, which /v1/completions "
                                "cannot fill: send images through /v1/chat/completions", param="prompt")
        return ids

    def _hold_images(self, held: int, image_bytes: int) -> int:
        """From the body's bytes to the images' own (fewer for data: URLs, which are base64 in the body;
        more for http(s) URLs, fetched since): what this request holds now."""
        if image_bytes > held:
            self.admission.reserve_bytes(image_bytes - held, time.monotonic(), own=held)
        elif image_bytes < held:
            self.admission.bytes.release(held - image_bytes, time.monotonic())
        return image_bytes

    def _check_image_count(self, urls: list[str]) -> None:
        limit = self.cfg.api.images.max_images_per_request
        if len(urls) > limit:
            raise ApiError(400, f"the request has {len(urls)} images, over the limit of {limit} "
                                "per request: send fewer images", param="messages", code="too_many_images")

    async def _load_images(self, urls: list[str]) -> tuple[list[bytes], list[tuple[int, int]]]:
        """The images' file bytes and their (width, height), read from their headers (their count was
        checked: `_check_image_count`). The decode, resize and patchify happen on the vision pool, so this
        replica's event loop stays free (and the images travel compressed)."""
        lim = self.cfg.api.images
        if not urls:
            return [], []

        async def load(number: int, url: str) -> bytes:
            try:
                if _is_data_url(url):  # base64 of megabytes: off the event loop
                    return await asyncio.to_thread(decode_data_url, url, max_bytes=self.fetch_policy.max_bytes)
                return await load_image_bytes(url, self.fetch_policy)
            except ApiError as exc:  # which of the request's images (numbered as the probe's errors are)
                which = f"image {number}" if _is_data_url(url) else f"image {number} ({url[:200]})"
                raise ApiError(exc.status, f"{which}: {exc.message}", param=exc.param, code=exc.code,
                               headers=exc.headers) from None

        loads = [asyncio.ensure_future(load(i + 1, u)) for i, u in enumerate(urls)]
        try:
            datas = await asyncio.gather(*loads)
        except BaseException:
            for task in loads:  # the first bad image ends the request: the other downloads stop too
                task.cancel()
            raise
        sizes = []
        for i, d in enumerate(datas):
            try:
                sizes.append(probe_image(d, max_bytes=lim.max_image_bytes))
            except ImageError as exc:
                raise ApiError(400, f"image {i + 1}: {exc}", param="messages", code="invalid_image") from None
        self.metrics.inc("dotsvlm_images", len(datas))
        return list(datas), sizes

    def _token_counts(self, sizes: list[tuple[int, int]]) -> list[int]:
        try:
            return pipeline.token_counts_for_sizes(sizes, self.model_config, self.cfg.api.images)
        except ImageError as exc:
            raise ApiError(400, str(exc), param="messages", code="invalid_image") from None

    def _sampling(self, req: GenerationRequest, prompt_tokens: int) -> dict[str, Any]:
        cfg = self.cfg
        where = "prompt" if isinstance(req, CompletionRequest) else "messages"
        room = cfg.context_length - prompt_tokens
        kv = cfg.kv_cache_tokens
        limit = req.completion_limit()
        if limit is None:
            if room < 1:
                raise self._too_long(prompt_tokens, 1, where)
            # The default also fits an LLM replica's KV cache (llm.kv_cache_tokens may be below the context): a
            # request that sent no max_tokens was refused with "lower max_tokens".
            limit = min(cfg.max_new_tokens_default, room, max(1, kv - prompt_tokens))
        elif prompt_tokens + limit > cfg.context_length:
            raise self._too_long(prompt_tokens, limit, where)
        if prompt_tokens + limit > kv:
            raise ApiError(400, f"the request needs {prompt_tokens + limit} KV-cache tokens but an LLM replica has "
                                f"{kv}: lower max_tokens or shorten the prompt", code="context_length_exceeded")
        return {"max_tokens": int(limit), "temperature": 1.0 if req.temperature is None else req.temperature,
                "top_p": 1.0 if req.top_p is None else req.top_p, "top_k": max(0, req.top_k or 0),
                "seed": req.seed, "stop": tuple(req.stop or ()), "ignore_eos": req.ignore_eos}

    def _check_text_fits(self, chars: int, where: str) -> int:
        """Refuse, before tokenizing it, a text too long for the context whatever its tokens: no token is longer
        than the vocabulary's longest (in characters), so it needs at least chars / that many. Tokenizing
        megabytes takes seconds and gigabytes of memory only to find the same."""
        if chars <= self.cfg.context_length:  # fits, whatever its tokens (each has at least one character)
            return chars
        if self._max_token_chars is None:
            self._max_token_chars = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        least = -(-chars // self._max_token_chars)
        if least > self.cfg.context_length:
            raise ApiError(400, f"this model's maximum context length is {self.cfg.context_length} tokens, but the "
                                f"{where} has {chars} characters, which cannot take fewer than {least} tokens: "
                                f"shorten the {where}", param=where, code="context_length_exceeded")
        return chars

    def _too_long(self, prompt: int, completion: int, where: str) -> ApiError:
        ctx = self.cfg.context_length
        shorten = ("shorten the messages, send fewer or smaller images" if where == "messages"
                   else "shorten the prompt")
        return ApiError(400, f"this model's maximum context length is {ctx} tokens, but the request needs "
                             f"{prompt + completion} ({prompt} in the {where}, {completion} for the completion): "
                             f"{shorten}, or lower max_tokens", param=where, code="context_length_exceeded")

    @staticmethod
    def _error_of(ev: ErrorEvent) -> ApiError:
        return ApiError(int(ev.get("code", 500)), str(ev.get("message", "generation failed")))

    def _observe_first_token(self, t0: float, n_images: int) -> float:
        now = time.monotonic()
        self.signals.first_token(now, n_images > 0, now - t0)
        self.metrics.observe("dotsvlm_time_to_first_token_seconds", now - t0, modality=_modality(n_images))
        return now

    def _observe_finish(self, ev: FinishEvent, t0: float, n_images: int, first_token_at: float | None = None) -> None:
        u = ev.get("usage", {})
        now = time.monotonic()
        modality = _modality(n_images)
        itl = self.signals.finished(now, first_token_at, int(u.get("completion_tokens", 0)))
        if itl is not None:  # the autoscaler's own sample
            self.metrics.observe("dotsvlm_inter_token_latency_seconds", itl, modality=modality)
        self.metrics.inc("dotsvlm_prompt_tokens", u.get("prompt_tokens", 0), modality=modality)
        self.metrics.inc("dotsvlm_completion_tokens", u.get("completion_tokens", 0), modality=modality)
        self.metrics.observe("dotsvlm_request_duration_seconds", now - t0, modality=modality)

    async def _complete(self, shape: str, cid: str, events: AsyncIterator[EventBatch], t0: float,
                        n_images: int) -> Response:
        """One JSON answer in the endpoint's shape (`shape`: chat, or text for /v1/completions)."""
        text: list[str] = []
        first = True
        first_at = None
        try:
            async for batch in events:
                for ev in batch:
                    kind = ev["type"]
                    if first and kind in ("token", "finish"):
                        first_at = self._observe_first_token(t0, n_images)
                        first = False
                    if kind == "restart":
                        text.clear()
                    elif kind == "token":
                        text.append(ev.get("text", ""))
                    elif kind == "error":
                        raise self._error_of(ev)
                    elif kind == "finish":
                        text.append(ev.get("text", ""))
                        self._observe_finish(ev, t0, n_images, first_at)
                        answer = completion_response if shape == "chat" else text_completion_response
                        return JSONResponse(answer(cid, self.model.served_model_name, "".join(text),
                                                   ev["finish_reason"], ev["usage"]))
        finally:
            await events.aclose()  # a client that went away (cancellation) cancels the generation
        raise ApiError(503, "the generation ended without a result; retry the request")

    async def _stream(self, shape: str, cid: str, req: GenerationRequest, events: AsyncIterator[EventBatch],
                      t0: float, n_images: int) -> Response:
        """SSE chunks: the text of the events that arrived together goes out as one chunk (a client that
        reads more slowly than tokens come gets fewer, longer chunks; none waits for more text)."""
        first = await events.__anext__()  # errors before the first token become HTTP errors
        if first[0]["type"] == "error":
            raise self._error_of(first[0])
        model, created = self.model.served_model_name, int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def sse(obj: dict) -> bytes:
            return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()

        def piece(text: str | None, finish_reason: str | None = None, usage: dict | None = None) -> bytes:
            """A chunk in the endpoint's shape: chat deltas or text completions; text None = usage only."""
            if shape == "text":
                return sse(text_completion_chunk(cid, model, created, text=text, finish_reason=finish_reason,
                                                 usage=usage))
            delta = None if text is None else ({"content": text} if text else {})
            return sse(chunk(cid, model, created, delta=delta, finish_reason=finish_reason, usage=usage))

        # How the stream ended, for the requests counter (`_counted`): a client gone before the end is a 499.
        outcome = {"code": CLIENT_CLOSED}

        async def body() -> AsyncIterator[bytes]:
            first_at = self._observe_first_token(t0, n_images)
            if shape == "chat":
                yield sse(chunk(cid, model, created, delta={"role": "assistant", "content": ""}))
            batch: EventBatch | None = first
            try:
                while True:
                    if batch is None:
                        batch = await events.__anext__()
                    text = "".join(ev.get("text", "") for ev in batch if ev["type"] in ("token", "finish"))
                    end = batch[-1]
                    batch = None
                    if text:
                        yield piece(text)
                    if end["type"] == "error":
                        outcome["code"] = int(end.get("code", 500))
                        yield sse(error_body(outcome["code"], str(end.get("message"))))
                        break
                    if end["type"] == "finish":
                        outcome["code"] = 200
                        yield piece("", finish_reason=end["finish_reason"])
                        if include_usage:
                            yield piece(None, usage=end["usage"])
                        self._observe_finish(end, t0, n_images, first_at)
                        break
            except StopAsyncIteration:
                outcome["code"] = 503
                yield sse(error_body(503, "the generation ended without a result; retry the request"))
            except ApiError as exc:
                outcome["code"] = exc.status
                yield sse(exc.body())
            except Exception:
                outcome["code"] = 500
                raise
            finally:
                await events.aclose()
            yield b"data: [DONE]\n\n"

        # No X-Request-Id here: Serve's proxy adds the request's own (the access log's), and a second would reach
        # clients joined with it ("<id>, chatcmpl-..."); the completion's id is in every chunk.
        response = StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        response.outcome = outcome  # type: ignore[attr-defined]
        return response


class _ClosingStream(StreamingResponse):
    """A streaming answer counted in flight (and open, for a head drain) until Starlette is done with it: its
    last chunk sent, or its client gone, also before the body's first chunk (Starlette stops at the
    response's start then, and a `finally` in a body generator that never started never runs)."""

    def __init__(self, inner: StreamingResponse, on_close: Any) -> None:  # (no super().__init__: a copy)
        self.__dict__.update(inner.__dict__)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


def _is_data_url(url: str) -> bool:
    """An image sent in the body (base64), not fetched from a server."""
    return url[:5].lower() == "data:"


def _text_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of text in the model's messages (strings, or the text parts of a list)."""
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return total


def _modality(n_images: int) -> str:
    return "image" if n_images else "text"


# This deployment's own Serve options; its slice, replicas and CPU share come from
# ServeAppConfig.deployment_options(). The class keeps its own name in the module: Ray then pickles it
# by reference, and FastAPI resolves the endpoints' annotations (`request: Request`) in the replica.
IngressDeployment = serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=4096)(serve.ingress(app)(Ingress))
