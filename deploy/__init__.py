"""Serving: a Ray Serve application that loads a model folder (docs/contracts.md, sections 3 and 4.4).

decoder.py    continuous batching over one model: pure PyTorch + asyncio, no Ray
sequence.py   one sampled text (Sequence); sampling.py: its sampling parameters (Sampling)
prefill.py    chunked prefill: primes and scores in slices between decode steps
api.py        requests, validation and errors of the HTTP API; limits.py: the limits
app.py        the text model's Serve deployment (FastAPI ingress), build_app, app_builder for config files
series_app.py the time-series model's deployment (POST /v1/forecast), build_series_app
ingress.py    what both share: JSON errors, the body limit, Serve options, config-file arguments
source.py     a model from a run or model folder at a path or a pyarrow.fs URI (serve, sample, eval, forecast)
client.py     CharRNNClient, on requests

Imports models/, pipeline.text.vocab and storage only: never training/."""
