"""The Ray Serve application for a text model: a FastAPI ingress on one deployment, CharRNNServer,
whose replicas each hold the model and a continuous-batching Decoder (docs/contracts.md, section 3).

    build_app(model, replicas=1 | autoscale=(min, max), gpu=False, limits=Limits(...))  -> Application
    app_builder(args)   the same, for Serve config files (import_path: deploy.app:app_builder); a
                        time-series model folder gets deploy.series_app's application instead

Overload is refused before any work is queued: a replica holds at most max_concurrent decoding plus
max_queued waiting sequences and answers 429 with Retry-After beyond that (in this API's JSON
error shape). Serve's own per-caller queue (max_queued_requests) stands behind it, also answering
429 with Retry-After."""

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from ray import serve

from deploy import playground, series_app, source
from deploy.api import APIError, parse_completion, parse_generate, parse_score, parse_session, parse_session_id
from deploy.decoder import Decoder, DecoderStopped
from deploy.ingress import (authorize, builder_arguments, deployment_options, error_response, install_error_handlers,
                            media_type, model_list, overloaded, read_body, read_json, set_up_replica)
from deploy.limits import RETRY_AFTER_S, Limits
from deploy.logprobs import choice_logprobs, prompt_logprobs
from deploy.metrics import RequestMetrics, ServingMetrics
from deploy.padded_step import choose_decode_precision
from deploy.session_leases import Lease, Sessions
from deploy.sessions import SessionStore
from models import PRECISIONS
from models.generate import bits_per_char
from storage import public_location
from pipeline.text.vocab import UNKNOWN_CHAR

logger = logging.getLogger("ray.serve")

api = FastAPI(title="charrnn", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)
api.add_middleware(RequestMetrics)




def _stopped_error(err: DecoderStopped) -> APIError:
    return APIError(503, f"this replica cannot decode: {err}; Serve replaces it (its health check fails)",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


@api.exception_handler(DecoderStopped)
async def _decoder_stopped(request: Request, err: DecoderStopped):
    return error_response(_stopped_error(err))


def _stream_error(err: Exception) -> dict:
    """A failure after the status line went out, said in the stream."""
    if isinstance(err, DecoderStopped):
        return _stopped_error(err).body()
    logger.exception("charrnn: stream failed")
    return APIError(500, f"internal error: {type(err).__name__}").body()


def _sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _openai_reason(seq) -> str:
    return "stop" if seq.finish_reason == "stop" else "length"


# Serve pickles the class when it is decorated: everything it uses must be defined above it.
@serve.deployment(max_constructor_retry_count=3)
@serve.ingress(api)
class CharRNNServer:
    def __init__(self, folder: str, name: str, limits: Limits, sessions, device: str = "cpu",
                 threads: int | None = None, decoder: dict | None = None, api_key_sha256: str | None = None,
                 precision: str = "auto"):
        set_up_replica(device, threads)
        self.model, self.vocab, _ = source.load(folder, device)
        precision, why = choose_decode_precision(self.model, limits.max_concurrent, precision)
        self.name, self.limits, self.created = name, limits, int(time.time())
        self.api_key_sha256 = api_key_sha256
        self.metrics = ServingMetrics.for_replica(name, lambda: self.decoder.stats())
        self.decoder = Decoder(self.model, self.vocab.chars + [UNKNOWN_CHAR], max_batch=limits.max_concurrent,
                               on_finish=self.metrics.finished,
                               **{"state_cache_bytes": limits.state_cache_mb << 20, "precision": precision,
                                  **(decoder or {})})
        self.sessions = Sessions(sessions, self.decoder, self.model, self._ids)
        cfg = self.model.config
        logger.info("charrnn: serving %s from %s (%s %dx%d, vocab %d) on %s, %d torch threads, min step batch %d, "
                    "decoding in %s", name, public_location(folder), cfg.cell, cfg.layers, cfg.hidden, cfg.vocab_size,
                    device, torch.get_num_threads(), self.decoder.min_step_batch, why)

    def check_health(self):
        self.decoder.raise_if_stopped()

    def __del__(self):
        if hasattr(self, "decoder"):
            self.decoder.close()

    # -- helpers ------------------------------------------------------------------------------------

    async def _json(self, request: Request) -> dict:
        authorize(request, self.api_key_sha256)
        return await read_json(request, self.limits.max_body_bytes)

    def _admit(self, sequences: int, chars: int) -> None:
        """Room for `sequences` more and `chars` more characters to prime or score, or 429."""
        capacity = self.limits.max_concurrent + self.limits.max_queued
        if self.decoder.load + sequences > capacity:
            raise overloaded(f"{self.decoder.load} sequences are decoding or waiting", capacity, "max_sequences")
        if self.decoder.queued_chars + chars > self.limits.max_queued_chars:
            raise overloaded(f"{self.decoder.queued_chars} characters are waiting to be primed or scored",
                             self.limits.max_queued_chars, "max_queued_chars")

    def _submit(self, prompts: list[str], n: int, sampling, sink=None, lease: Lease | None = None) -> list:
        """n sequences per prompt, choice j seeded seed + j, the prompt primed once for all n (from
        the session's context with a lease); characters outside the vocabulary read as the unknown id."""
        self._admit(len(prompts) * n, sum(map(len, prompts)))
        seqs = []
        for prompt in prompts:
            samplings = [sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + j)
                         for j in range(n)]
            seqs += self.decoder.submit_group(self._ids(prompt), samplings, sink, len(seqs),
                                              lease.context if lease else None)
        return seqs

    def _ids(self, text: str) -> list[int]:
        return self.vocab.encode(text).tolist()

    @staticmethod
    async def _wait(seqs: list) -> None:
        try:
            await asyncio.gather(*(asyncio.shield(s.done) for s in seqs))
        except BaseException:  # the client went away (or one sequence failed): stop the others
            for s in seqs:
                s.cancel()
            raise

    @staticmethod
    async def _events(seqs: list, sink: asyncio.Queue):
        """(sequence, text) as the decoder streams it; text None when that sequence is finished."""
        left = len(seqs)
        try:
            while left:
                seq, item = await sink.get()
                if isinstance(item, BaseException):
                    raise item
                left -= item is None
                yield seq, item
        finally:  # the client went away: stop decoding for it
            for s in seqs:
                if s.finish_reason is None:
                    s.cancel()

    # -- routes -------------------------------------------------------------------------------------

    @api.get("/")
    async def playground(self):
        """A page to try the model in a browser (deploy/playground.py); it calls the API like any client."""
        html, headers = playground.page()
        return HTMLResponse(html, headers=headers)

    @api.get("/healthz")
    async def healthz(self):
        try:
            self.decoder.raise_if_stopped()
        except RuntimeError as err:
            raise APIError(503, f"unhealthy: {err}") from None
        return {"status": "ok", "model": self.name, "stats": self.decoder.stats()}

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        authorize(request, self.api_key_sha256)
        cfg = self.model.config
        return {"model": self.name, "network": cfg.to_json(), "device": str(self.decoder.device),
                "threads": torch.get_num_threads(), "limits": dataclasses.asdict(self.limits),
                "decoder": self.decoder.stats()}

    @api.get("/v1/models")
    async def models(self, request: Request):
        authorize(request, self.api_key_sha256)
        return model_list(self.name, self.created)

    @api.post("/v1/generate")
    async def generate(self, request: Request):
        req = parse_generate(await self._json(request), self.limits)
        lease = await self.sessions.take(req.session)
        try:
            sink = asyncio.Queue() if req.stream else None
            [seq] = self._submit([req.prime], 1, req.sampling, sink, lease)
        except BaseException:
            self.sessions.release(lease)
            raise
        if req.stream:
            return StreamingResponse(self._generate_stream(seq, sink, lease, req.prime),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            await self._wait([seq])
            session = await self.sessions.give_back(lease, req.prime, seq)
        except BaseException:
            self.sessions.release(lease)
            raise
        return {"text": seq.text, "chars": len(seq.chars), "finish_reason": seq.finish_reason, "seed": seq.seed,
                "model": self.name, **({"session": session} if session else {})}

    async def _generate_stream(self, seq, sink, lease, prime):
        try:
            async with contextlib.aclosing(self._events([seq], sink)) as events:
                async for seq, text in events:
                    if text is not None:
                        yield _sse({"text": text})
            session = await self.sessions.give_back(lease, prime, seq)
            lease = None
            yield _sse({"text": "", "finish_reason": seq.finish_reason, "chars": len(seq.chars), "seed": seq.seed,
                        **({"session": session} if session else {})})
        except Exception as err:  # the status line is gone: say it in the stream
            yield _sse(_stream_error(err))
        finally:
            self.sessions.release(lease)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = parse_completion(await self._json(request), self.limits, self.name)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        lease = await self.sessions.take(req.session)
        try:
            sink = asyncio.Queue() if req.stream else None
            seqs = self._submit(req.prompts, req.n, req.sampling, sink, lease)
            echoed = prompt_logprobs(self.decoder, req, self._ids)
        except BaseException:
            self.sessions.release(lease)
            raise
        if req.stream:
            return StreamingResponse(self._completion_stream(req, head, seqs, sink, echoed, lease),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            await self._wait(seqs)
            echoed = [await e for e in echoed]
            session = await self.sessions.give_back(lease, req.prompts[0], seqs[0])
        except BaseException:
            self.sessions.release(lease)
            raise
        choices = [{"text": (req.prompts[s.index // req.n] if req.echo else "") + s.text, "index": s.index,
                    "logprobs": choice_logprobs(req, s, echoed), "finish_reason": _openai_reason(s)}
                   for s in seqs]
        return {**head, "choices": choices, "usage": self._usage(req, seqs),
                **({"session": session} if session else {})}

    async def _completion_stream(self, req, head, seqs, sink, echoed, lease):
        def chunk(seq, text, reason=None, logprobs=None):
            return _sse({**head, "choices": [{"text": text, "index": seq.index, "logprobs": logprobs,
                                              "finish_reason": reason}]})
        sent = [0] * len(seqs)  # characters streamed per choice
        try:
            if req.echo:
                for s in seqs:
                    prompt_logprobs = await echoed[s.index // req.n] if echoed else None
                    yield chunk(s, req.prompts[s.index // req.n], logprobs=prompt_logprobs)
            async with contextlib.aclosing(self._events(seqs, sink)) as events:
                async for seq, text in events:
                    if text is None:
                        yield chunk(seq, "", _openai_reason(seq))
                        continue
                    start, sent[seq.index] = sent[seq.index], sent[seq.index] + len(text)
                    logprobs = choice_logprobs(req, seq, [], start, sent[seq.index])
                    yield chunk(seq, text, logprobs=logprobs)
            session = await self.sessions.give_back(lease, req.prompts[0], seqs[0])
            lease = None
            if req.include_usage or session:
                yield _sse({**head, "choices": [], **({"usage": self._usage(req, seqs)} if req.include_usage else {}),
                            **({"session": session} if session else {})})
        except Exception as err:
            yield _sse(_stream_error(err))
        finally:
            self.sessions.release(lease)
        yield _sse("[DONE]")

    @staticmethod
    def _usage(req, seqs) -> dict:
        prompt = sum(map(len, req.prompts))
        completion = sum(len(s.chars) for s in seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @api.post("/v1/score")
    async def score(self, request: Request):
        req = parse_score(await self._json(request), self.limits)
        self._admit(1, len(req.text))
        scored = await self.decoder.score(self._ids(req.text), 0 if req.per_char else None)
        loss = scored.total / scored.count
        answer = {"loss": loss, "bits_per_char": bits_per_char(loss), "chars": scored.count, "model": self.name}
        if req.per_char:  # surprisal in nats: -log p(character | the ones before it)
            answer |= {"tokens": list(req.text), "surprisal": [None] + [-lp for lp in scored.logprobs]}
        return answer

    # -- sessions ------------------------------------------------------------------------------------

    @api.post("/v1/sessions")
    async def create_session(self, request: Request):
        """{prime} as JSON: a session after that text; or a state exported by GET .../state, sent as
        application/octet-stream: the same session on this server."""
        authorize(request, self.api_key_sha256)
        if media_type(request) == "application/octet-stream":
            context, length = self.sessions.decode(await read_body(request, self.limits.max_body_bytes,
                                                                   "application/octet-stream"))
        else:
            prime = parse_session(await read_json(request, self.limits.max_body_bytes), self.limits)
            self._admit(1, len(prime))
            context, length = await self.decoder.context(self._ids(prime)), len(prime)
        return {**await self.sessions.create(context, length), "model": self.name}

    @api.get("/v1/sessions/{session}")
    async def session_info(self, session: str, request: Request):
        authorize(request, self.api_key_sha256)
        return {**await self.sessions.ask("info", parse_session_id(session)), "model": self.name}

    @api.delete("/v1/sessions/{session}")
    async def delete_session(self, session: str, request: Request):
        authorize(request, self.api_key_sha256)
        return await self.sessions.ask("delete", parse_session_id(session))

    @api.get("/v1/sessions/{session}/state")
    async def export_session(self, session: str, request: Request):
        authorize(request, self.api_key_sha256)
        state = (await self.sessions.ask("export", parse_session_id(session)))["state"]
        return Response(state, media_type="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="state.safetensors"'})


def build_app(model: str, *, name: str | None = None, replicas: int = 1, autoscale: tuple[int, int] | None = None,
              target_ongoing: float | None = None, gpu: bool = False, num_cpus: float = 1.0,
              threads: int | None = None, limits: Limits | dict | None = None, decoder: dict | None = None,
              api_key_sha256: str | None = None, precision: str = "auto"):
    """The bound application serving the model folder or run folder `model` (a path or a pyarrow.fs
    URI). `replicas` fixed, or `autoscale` (min, max) aiming at `target_ongoing` requests per replica
    (default: half of max_concurrent). `gpu`: one GPU per replica. `threads`: torch threads per
    replica (default: its `num_cpus`). `decoder`: Decoder options (flush_chars, log_interval_s, ...).
    `api_key_sha256`: every /v1 route then needs the key whose digest it is (ingress.api_key_digest).
    `precision`: what decode steps compute in: auto (bf16 where native and measured faster), fp32, bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    folder = source.resolve(model)
    limits = limits if isinstance(limits, Limits) else Limits(**(limits or {}))
    options = deployment_options(limits, replicas, autoscale, target_ongoing, gpu, num_cpus)
    name = name or source.default_name(folder)
    sessions = SessionStore.bind(limits.max_sessions, limits.session_ttl_s, limits.max_session_mb << 20, name)
    return CharRNNServer.options(**options).bind(folder, name, limits, sessions,
                                                 "cuda" if gpu else "cpu", threads or max(1, int(num_cpus)), decoder,
                                                 api_key_sha256, precision)


def app_builder(args: dict):
    """For Serve config files and `serve run deploy.app:app_builder model=PATH key=value ...`: the
    arguments of build_app plus every Limits field, by name (strings are converted). A time-series
    model folder gets deploy.series_app's application, with its limits."""
    if "model" in args and source.task(source.resolve(str(args["model"]))) == "series":
        return series_app.app_builder(args)
    return build_app(**builder_arguments(args, "text", {"decoder": dict, "precision": str}))
