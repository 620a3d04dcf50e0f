"""The Ray Serve application for a time-series model (docs/contracts.md, section 4.4): a FastAPI
ingress on one deployment, SeriesServer, whose replicas each hold the model and forecast concurrent
requests together.

    build_series_app(model, replicas=1 | autoscale=(min, max), gpu=False, limits=SeriesLimits(...))
    app_builder(args)   the same, for Serve config files (deploy.app:app_builder sends series folders here)

Batching is Serve's: a request waits in a `@serve.batch` queue (at most `batch_wait_s` for others,
or while the batch before it runs), then one models.forecast call serves the whole batch. A replica
holds at most max_concurrent + max_queued forecasts and answers 429 with Retry-After beyond that."""
# No `from __future__ import annotations` here: FastAPI, behind Serve's ingress, must see the routes'
# `Request` annotation as the class itself to pass the request in.
import asyncio
import logging
import time
from collections import Counter

import numpy as np
import torch
from fastapi import FastAPI, Request
from ray import serve

from deploy import source
from deploy.api import APIError, parse_forecast
from deploy.ingress import (authorize, builder_arguments, deployment_options, install_error_handlers, model_list,
                            overloaded, read_json, set_up_replica)
from deploy.limits import SeriesLimits
from models import Normalization, forecast
from storage import public_location

logger = logging.getLogger("ray.serve")
BATCH_WAIT_S = 0.005  # what a lone request pays for the chance of company; a busy replica batches anyway

api = FastAPI(title="charrnn series", docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)


@serve.deployment(max_constructor_retry_count=3)
@serve.ingress(api)
class SeriesServer:
    def __init__(self, folder: str, name: str, limits: SeriesLimits, device: str = "cpu", threads: int | None = None,
                 batch_wait_s: float = BATCH_WAIT_S, api_key_sha256: str | None = None):
        set_up_replica(device, threads)
        self.model, feature_scaling, _ = source.load_series(folder, device)
        self.normalization = Normalization(feature_scaling["mean"], feature_scaling["std"])
        self.name, self.limits, self.created = name, limits, int(time.time())
        self.api_key_sha256 = api_key_sha256
        # The decorator's values are the defaults; this replica's limits replace them.
        self._forecast_batch.set_max_batch_size(limits.max_concurrent)
        self._forecast_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.pending = 0  # forecasts admitted and not answered yet
        self.batches = Counter()  # batch size -> models.forecast calls
        cfg = self.model.config
        logger.info("charrnn: serving series model %s from %s (%s %dx%d, columns %s) on %s, %d torch threads",
                    name, public_location(folder), cfg.cell, cfg.layers, cfg.hidden,
                    ", ".join(feature_scaling["columns"]), device, torch.get_num_threads())

    @serve.batch(max_batch_size=SeriesLimits.max_concurrent, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _forecast_batch(self, histories: list[np.ndarray], steps: list[int]) -> list[np.ndarray]:
        self.batches[len(histories)] += 1
        # In a thread, so that the replica keeps taking requests (and filling the next batch) meanwhile.
        return await asyncio.to_thread(forecast, self.model, self.normalization, histories, steps)

    def _stats(self) -> dict:
        calls = sum(self.batches.values())
        forecasts = sum(size * n for size, n in self.batches.items())
        return {"forecasts": forecasts, "batches": calls, "max_batch_seen": max(self.batches, default=0),
                "mean_batch": forecasts / calls if calls else 0.0,
                "batch_histogram": {str(size): n for size, n in sorted(self.batches.items())},
                "pending": self.pending}

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "model": self.name, "stats": self._stats()}

    @api.get("/v1/models")
    async def models(self, request: Request):
        authorize(request, self.api_key_sha256)
        return model_list(self.name, self.created)

    @api.post("/v1/forecast")
    async def forecast(self, request: Request):
        authorize(request, self.api_key_sha256)
        req = parse_forecast(await read_json(request, self.limits.max_body_bytes), self.limits,
                             self.model.config.features)
        capacity = self.limits.max_concurrent + self.limits.max_queued
        if self.pending >= capacity:
            raise overloaded(f"{self.pending} forecasts are running or waiting", capacity, "max_forecasts")
        self.pending += 1
        try:
            predicted = await self._forecast_batch(req.history, req.steps)
        finally:
            self.pending -= 1
        # Finite inputs far outside the training range can still overflow float32 inside the network.
        if not np.isfinite(predicted).all():
            raise APIError(422, "'history' holds values too large for this model: the forecast overflowed",
                           "history")
        return {"forecast": predicted[:, 0].tolist() if req.flat else predicted.tolist(), "steps": req.steps,
                "model": self.name}


def build_series_app(model: str, *, name: str | None = None, replicas: int = 1,
                     autoscale: tuple[int, int] | None = None, target_ongoing: float | None = None, gpu: bool = False,
                     num_cpus: float = 1.0, threads: int | None = None, limits: SeriesLimits | dict | None = None,
                     batch_wait_s: float = BATCH_WAIT_S, api_key_sha256: str | None = None):
    """The bound application serving the time-series model folder or run folder `model` (a path or a
    pyarrow.fs URI); the options are build_app's (deploy/app.py). `batch_wait_s`: how long a request
    waits for others to join its batch."""
    folder = source.resolve(model)
    limits = limits if isinstance(limits, SeriesLimits) else SeriesLimits(**(limits or {}))
    options = deployment_options(limits, replicas, autoscale, target_ongoing, gpu, num_cpus)
    return SeriesServer.options(**options).bind(folder, name or source.default_name(folder), limits,
                                                "cuda" if gpu else "cpu", threads or max(1, int(num_cpus)),
                                                batch_wait_s, api_key_sha256)


def app_builder(args: dict):
    """For Serve config files: build_series_app's arguments plus every SeriesLimits field, by name."""
    return build_series_app(**builder_arguments(args, "series", {"batch_wait_s": float}))
