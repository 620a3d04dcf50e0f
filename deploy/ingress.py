"""What the text and the time-series Serve applications share (docs/contracts.md, sections 3 and 4.4):
every error in the API's JSON shape, the API key, reading a body under the size limit, a replica's
start-up and GET /v1/models, the deployment's Serve options, and the arguments of a Serve config
file's application."""
from __future__ import annotations

import hashlib
import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from deploy.api import APIError, parse_body
from deploy.limits import LIMIT_NAMES, RETRY_AFTER_S, limits_for

logger = logging.getLogger("ray.serve")
HEADROOM = 16  # requests a full replica still takes beyond its own limits: health, models, stats


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install_error_handlers(api: FastAPI) -> None:
    """Every error `api` answers, unknown routes and bugs included, in the JSON shape of section 3."""

    @api.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return _refused(request, err)

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        message = {404: f"no such route: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(err.status_code,
                                                                                       str(err.detail))
        return _refused(request, APIError(err.status_code, message, headers=err.headers))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _refused(request, APIError(400, first.get("msg", "invalid request"), param))

    @api.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        logger.exception("charrnn: %s %s failed", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(err).__name__}"))


def _refused(request: Request, err: APIError) -> JSONResponse:
    request.state.rejection = err.reason  # for the metrics middleware, which sees only the response
    return error_response(err)


def set_up_replica(device: str, threads: int | None) -> None:
    """Before a replica loads its model: its torch threads, and a clear error where --gpu finds no GPU."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--gpu: this replica sees no CUDA device")


def model_list(name: str, created: int) -> dict:
    """GET /v1/models: the one model a replica serves, as OpenAI clients read it."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "charrnn"}]}


def api_key_digest(key: str) -> str:
    """What a replica keeps of the API key: its SHA-256, so no config, actor argument or dashboard
    ever holds the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()


def authorize(request: Request, key_digest: str | None) -> None:
    """With an API key set, every /v1 route needs `Authorization: Bearer KEY` (401 otherwise)."""
    if key_digest is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(api_key_digest(token.strip()), key_digest):
        raise APIError(401, "a valid API key is required: send Authorization: Bearer KEY",
                       headers={"WWW-Authenticate": "Bearer"})


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object. Only `Content-Type: application/json` (415 otherwise): a web page
    can send a text/plain or form body to a local server without asking, never a JSON one."""
    return parse_body(await read_body(request, limit, "application/json"))


async def read_body(request: Request, limit: int, wanted: str) -> bytes:
    """The body, sent as `wanted` (415 otherwise). Refused (413) as soon as it is known to be over
    `limit` bytes: from Content-Length when there is one, else while it streams in."""
    if media_type(request) != wanted:
        raise APIError(415, f"the request body must be sent as Content-Type: {wanted}, "
                            f"got {media_type(request) or 'no Content-Type'}")
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
    return b"".join(chunks)


def overloaded(what: str, capacity: int, reason: str) -> APIError:
    return APIError(429, f"the server is busy: {what} (capacity {capacity}); retry in {RETRY_AFTER_S} s",
                    headers={"Retry-After": str(RETRY_AFTER_S)}, reason=reason)


def deployment_options(limits, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                       target_ongoing: float | None = None, gpu: bool = False, num_cpus: float = 1.0) -> dict:
    """A deployment's Serve options: scale, resources, and Serve's queues behind the replica's own
    (`limits` has max_concurrent and max_queued)."""
    options = dict(max_ongoing_requests=limits.max_concurrent + limits.max_queued + HEADROOM,
                   max_queued_requests=limits.max_queued + HEADROOM,
                   backpressure_config={"status_code": 429, "retry_after_s": RETRY_AFTER_S},
                   ray_actor_options={"num_cpus": num_cpus, "num_gpus": 1 if gpu else 0})
    if autoscale is not None:
        low, high = autoscale
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")
        target = target_ongoing or max(1, limits.max_concurrent // 2)
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": target}
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


def builder_arguments(args: dict, task: str, extra: dict | None = None) -> dict:
    """A config file's application arguments (`serve run` passes strings) as keyword arguments of
    the `task` application's build function: the common ones, `extra` {name: converter}, and the
    limits by name, gathered into `limits` (limits_for: the other task's only at their defaults)."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("the application needs a 'model' argument: a run folder, model folder or URI")
    limits = {k: int(args.pop(k)) for k in list(args) if k in LIMIT_NAMES}
    kinds = {"model": str, "name": str, "api_key_sha256": str, "replicas": int, "target_ongoing": float,
             "gpu": _boolean, "num_cpus": float, "threads": int, "autoscale": parse_autoscale, **(extra or {})}
    unknown = sorted(set(args) - set(kinds))
    if unknown:
        raise ValueError(f"unknown application arguments: {', '.join(unknown)}")
    return {**{k: kinds[k](v) if v is not None else None for k, v in args.items()},
            "limits": limits_for(task, limits)}


def _boolean(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return bool(value)
