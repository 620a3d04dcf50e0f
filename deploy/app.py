"""The Ray Serve application: a FastAPI ingress on one deployment, CharRNNServer, whose replicas each
hold the model and a continuous-batching Decoder (docs/contracts.md, section 3).

    build_app(model, replicas=1 | autoscale=(min, max), gpu=False, limits=Limits(...))  -> Application
    app_builder(args)   the same, for Serve config files (import_path: deploy.app:app_builder)

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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from deploy import source
from deploy.api import APIError, parse_body, parse_completion, parse_generate, parse_score
from deploy.decoder import Decoder
from deploy.limits import Limits
from models.generate import bits_per_char
from pipeline.vocab import UNKNOWN_CHAR

logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1
HEADROOM = 16  # requests a full replica still takes beyond its decoding limits: health, models, stats

api = FastAPI(title="charrnn", docs_url=None, redoc_url=None, openapi_url=None)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(APIError)
async def _api_error(request: Request, err: APIError):
    return _error_response(err)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, err: HTTPException):
    message = {404: f"no such route: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
    return _error_response(APIError(err.status_code, message, headers=err.headers))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError):
    first = err.errors()[0] if err.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return _error_response(APIError(400, first.get("msg", "invalid request"), param))


@api.exception_handler(Exception)
async def _internal_error(request: Request, err: Exception):
    logger.exception("charrnn: %s %s failed", request.method, request.url.path)
    return _error_response(APIError(500, f"internal error: {type(err).__name__}"))


def _sse(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _openai_reason(seq) -> str:
    return "stop" if seq.finish_reason == "stop" else "length"


# Serve pickles the class when it is decorated: everything it uses must be defined above it.
@serve.deployment(max_constructor_retry_count=3)
@serve.ingress(api)
class CharRNNServer:
    def __init__(self, folder: str, name: str, limits: Limits, device: str = "cpu", threads: int | None = None,
                 decoder: dict | None = None):
        if threads:
            torch.set_num_threads(threads)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("--gpu: this replica sees no CUDA device")
        self.model, self.vocab, _ = source.load(folder, device)
        self.name, self.limits, self.created = name, limits, int(time.time())
        self.decoder = Decoder(self.model, self.vocab.chars + [UNKNOWN_CHAR], max_batch=limits.max_concurrent,
                               **(decoder or {}))
        cfg = self.model.config
        logger.info("charrnn: serving %s from %s (%s %dx%d, vocab %d) on %s, %d torch threads, min step batch %d",
                    name, folder, cfg.cell, cfg.layers, cfg.hidden, cfg.vocab_size, device, torch.get_num_threads(),
                    self.decoder.min_step_batch)

    def check_health(self):
        self.decoder.check()

    def __del__(self):
        if hasattr(self, "decoder"):
            self.decoder.close()

    # -- helpers ------------------------------------------------------------------------------------

    async def _json(self, request: Request) -> dict:
        limit = self.limits.max_body_bytes
        too_large = APIError(413, f"the request body is larger than the limit of {limit} bytes")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return parse_body(b"".join(chunks))

    def _admit(self, sequences: int) -> None:
        capacity = self.limits.max_concurrent + self.limits.max_queued
        if self.decoder.load + sequences > capacity:
            raise APIError(429, f"the server is busy: {self.decoder.load} sequences are decoding or waiting "
                                f"(capacity {capacity}); retry in {RETRY_AFTER_S} s",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    def _submit(self, prompts: list[str], n: int, sampling, sink=None) -> list:
        """n sequences per prompt, choice j seeded seed + j; the prompt's characters outside the
        vocabulary read as the unknown id."""
        self._admit(len(prompts) * n)
        seqs = []
        for prompt in prompts:
            ids = self.vocab.encode(prompt).tolist()
            for j in range(n):
                s = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + j)
                seqs.append(self.decoder.submit(ids, s, sink, index=len(seqs)))
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
            self.decoder.check()
        except RuntimeError as err:
            raise APIError(503, f"unhealthy: {err}") from None
        return {"status": "ok", "model": self.name, "stats": self.decoder.stats()}

    @api.get("/v1/stats")
    async def stats(self):
        cfg = self.model.config
        return {"model": self.name, "network": cfg.to_json(), "device": str(self.decoder.device),
                "threads": torch.get_num_threads(), "limits": dataclasses.asdict(self.limits),
                "decoder": self.decoder.stats()}

    @api.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "charrnn"}]}

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
            logger.exception("charrnn: stream failed")
            yield _sse(APIError(500, f"internal error: {type(err).__name__}").body())

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
            logger.exception("charrnn: stream failed")
            yield _sse(APIError(500, f"internal error: {type(err).__name__}").body())
        yield _sse("[DONE]")

    @staticmethod
    def _usage(req, seqs) -> dict:
        prompt = sum(map(len, req.prompts))
        completion = sum(len(s.chars) for s in seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @api.post("/v1/score")
    async def score(self, request: Request):
        text = parse_score(await self._json(request), self.limits)
        self._admit(1)
        total, count = await self.decoder.score(self.vocab.encode(text).tolist())
        return {"loss": total / count, "bits_per_char": bits_per_char(total / count), "chars": count,
                "model": self.name}


def build_app(model: str, *, name: str | None = None, replicas: int = 1, autoscale: tuple[int, int] | None = None,
              target_ongoing: float | None = None, gpu: bool = False, num_cpus: float = 1.0,
              threads: int | None = None, limits: Limits | dict | None = None, decoder: dict | None = None):
    """The bound application serving the model folder or run folder `model` (a path or a pyarrow.fs
    URI). `replicas` fixed, or `autoscale` (min, max) aiming at `target_ongoing` requests per replica
    (default: half of max_concurrent). `gpu`: one GPU per replica. `threads`: torch threads per
    replica (default: its `num_cpus`). `decoder`: Decoder options (flush_chars, log_interval_s, ...)."""
    folder = source.resolve(model)
    limits = limits if isinstance(limits, Limits) else Limits(**(limits or {}))
    options = deployment_options(limits, replicas, autoscale, target_ongoing, gpu, num_cpus)
    return CharRNNServer.options(**options).bind(folder, name or source.default_name(folder), limits,
                                                 "cuda" if gpu else "cpu", threads or max(1, int(num_cpus)), decoder)


def deployment_options(limits: Limits, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                       target_ongoing: float | None = None, gpu: bool = False, num_cpus: float = 1.0) -> dict:
    """CharRNNServer's Serve options: scale, resources, and Serve's queues behind the replica's own."""
    options = dict(max_ongoing_requests=limits.max_concurrent + limits.max_queued + HEADROOM,
                   max_queued_requests=limits.max_queued + HEADROOM,
                   backpressure_config={"status_code": 429, "retry_after_s": RETRY_AFTER_S},
                   ray_actor_options={"num_cpus": num_cpus, "num_gpus": 1 if gpu else 0})
    if autoscale is not None:
        low, high = autoscale
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": target_ongoing or max(1, limits.max_concurrent // 2)}
    elif not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
    else:
        options["num_replicas"] = replicas
    return options


def parse_autoscale(value) -> tuple[int, int]:
    """'MIN:MAX' (or a pair) -> (min, max)."""
    try:
        low, high = value.split(":") if isinstance(value, str) else value
        return int(low), int(high)
    except (TypeError, ValueError):
        raise ValueError(f"autoscale must be MIN:MAX (two integers), got {value!r}") from None


def app_builder(args: dict):
    """For Serve config files and `serve run deploy.app:app_builder model=PATH key=value ...`: the
    arguments of build_app plus every Limits field, by name (strings are converted)."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("the application needs a 'model' argument: a run folder, model folder or URI")
    limit_names = {f.name for f in dataclasses.fields(Limits)}
    limits = {k: int(args.pop(k)) for k in list(args) if k in limit_names}
    kinds = {"model": str, "name": str, "replicas": int, "target_ongoing": float, "gpu": _boolean,
             "num_cpus": float, "threads": int, "autoscale": parse_autoscale, "decoder": dict}
    unknown = sorted(set(args) - set(kinds))
    if unknown:
        raise ValueError(f"unknown application arguments: {', '.join(unknown)}")
    return build_app(**{k: kinds[k](v) if v is not None else None for k, v in args.items()}, limits=limits)


def _boolean(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return bool(value)
