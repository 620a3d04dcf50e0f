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
from fastapi.responses import StreamingResponse
from ray import serve

from deploy import series_app, source
from deploy.api import APIError, parse_completion, parse_generate, parse_score
from deploy.decoder import Decoder, DecoderStopped
from deploy.ingress import (authorize, builder_arguments, deployment_options, error_response, install_error_handlers,
                            model_list, overloaded, read_json, set_up_replica)
from deploy.limits import RETRY_AFTER_S, Limits
from models.generate import bits_per_char
from storage import public_location
from pipeline.text.vocab import UNKNOWN_CHAR

logger = logging.getLogger("ray.serve")

api = FastAPI(title="charrnn", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)


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
    def __init__(self, folder: str, name: str, limits: Limits, device: str = "cpu", threads: int | None = None,
                 decoder: dict | None = None, api_key_sha256: str | None = None):
        set_up_replica(device, threads)
        self.model, self.vocab, _ = source.load(folder, device)
        self.name, self.limits, self.created = name, limits, int(time.time())
        self.api_key_sha256 = api_key_sha256
        self.decoder = Decoder(self.model, self.vocab.chars + [UNKNOWN_CHAR], max_batch=limits.max_concurrent,
                               **(decoder or {}))
        cfg = self.model.config
        logger.info("charrnn: serving %s from %s (%s %dx%d, vocab %d) on %s, %d torch threads, min step batch %d",
                    name, public_location(folder), cfg.cell, cfg.layers, cfg.hidden, cfg.vocab_size, device,
                    torch.get_num_threads(), self.decoder.min_step_batch)

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
            raise overloaded(f"{self.decoder.load} sequences are decoding or waiting", capacity)
        if self.decoder.queued_chars + chars > self.limits.max_queued_chars:
            raise overloaded(f"{self.decoder.queued_chars} characters are waiting to be primed or scored",
                             self.limits.max_queued_chars)

    def _submit(self, prompts: list[str], n: int, sampling, sink=None) -> list:
        """n sequences per prompt, choice j seeded seed + j, the prompt primed once for all n; the
        prompt's characters outside the vocabulary read as the unknown id."""
        self._admit(len(prompts) * n, sum(map(len, prompts)))
        seqs = []
        for prompt in prompts:
            samplings = [sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + j)
                         for j in range(n)]
            seqs += self.decoder.submit_group(self.vocab.encode(prompt).tolist(), samplings, sink, len(seqs))
        return seqs

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
        if req.stream:
            sink = asyncio.Queue()
            seqs = self._submit([req.prime], 1, req.sampling, sink)
            return StreamingResponse(self._generate_stream(seqs, sink), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        [seq] = self._submit([req.prime], 1, req.sampling)
        await self._wait([seq])
        return {"text": seq.text, "chars": len(seq.chars), "finish_reason": seq.finish_reason, "seed": seq.seed,
                "model": self.name}

    async def _generate_stream(self, seqs, sink):
        try:
            async with contextlib.aclosing(self._events(seqs, sink)) as events:
                async for seq, text in events:
                    yield _sse({"text": text} if text is not None else
                               {"text": "", "finish_reason": seq.finish_reason, "chars": len(seq.chars),
                                "seed": seq.seed})
        except Exception as err:  # the status line is gone: say it in the stream
            yield _sse(_stream_error(err))

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = parse_completion(await self._json(request), self.limits, self.name)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name}
        if req.stream:
            sink = asyncio.Queue()
            seqs = self._submit(req.prompts, req.n, req.sampling, sink)
            return StreamingResponse(self._completion_stream(req, head, seqs, sink), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        seqs = self._submit(req.prompts, req.n, req.sampling)
        await self._wait(seqs)
        choices = [{"text": (req.prompts[s.index // req.n] if req.echo else "") + s.text, "index": s.index,
                    "logprobs": None, "finish_reason": _openai_reason(s)} for s in seqs]
        return {**head, "choices": choices, "usage": self._usage(req, seqs)}

    async def _completion_stream(self, req, head, seqs, sink):
        def chunk(seq, text, reason=None):
            return _sse({**head, "choices": [{"text": text, "index": seq.index, "logprobs": None,
                                              "finish_reason": reason}]})
        try:
            if req.echo:
                for s in seqs:
                    yield chunk(s, req.prompts[s.index // req.n])
            async with contextlib.aclosing(self._events(seqs, sink)) as events:
                async for seq, text in events:
                    yield chunk(seq, text) if text is not None else chunk(seq, "", _openai_reason(seq))
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(req, seqs)})
        except Exception as err:
            yield _sse(_stream_error(err))
        yield _sse("[DONE]")

    @staticmethod
    def _usage(req, seqs) -> dict:
        prompt = sum(map(len, req.prompts))
        completion = sum(len(s.chars) for s in seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @api.post("/v1/score")
    async def score(self, request: Request):
        text = parse_score(await self._json(request), self.limits)
        self._admit(1, len(text))
        total, count = await self.decoder.score(self.vocab.encode(text).tolist())
        return {"loss": total / count, "bits_per_char": bits_per_char(total / count), "chars": count,
                "model": self.name}


def build_app(model: str, *, name: str | None = None, replicas: int = 1, autoscale: tuple[int, int] | None = None,
              target_ongoing: float | None = None, gpu: bool = False, num_cpus: float = 1.0,
              threads: int | None = None, limits: Limits | dict | None = None, decoder: dict | None = None,
              api_key_sha256: str | None = None):
    """The bound application serving the model folder or run folder `model` (a path or a pyarrow.fs
    URI). `replicas` fixed, or `autoscale` (min, max) aiming at `target_ongoing` requests per replica
    (default: half of max_concurrent). `gpu`: one GPU per replica. `threads`: torch threads per
    replica (default: its `num_cpus`). `decoder`: Decoder options (flush_chars, log_interval_s, ...).
    `api_key_sha256`: every /v1 route then needs the key whose digest it is (ingress.api_key_digest)."""
    folder = source.resolve(model)
    limits = limits if isinstance(limits, Limits) else Limits(**(limits or {}))
    options = deployment_options(limits, replicas, autoscale, target_ongoing, gpu, num_cpus)
    return CharRNNServer.options(**options).bind(folder, name or source.default_name(folder), limits,
                                                 "cuda" if gpu else "cpu", threads or max(1, int(num_cpus)), decoder,
                                                 api_key_sha256)


def app_builder(args: dict):
    """For Serve config files and `serve run deploy.app:app_builder model=PATH key=value ...`: the
    arguments of build_app plus every Limits field, by name (strings are converted). A time-series
    model folder gets deploy.series_app's application, with its limits."""
    if "model" in args and source.task(source.resolve(str(args["model"]))) == "series":
        return series_app.app_builder(args)
    return build_app(**builder_arguments(args, "text", {"decoder": dict}))
