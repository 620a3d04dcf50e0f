"""Serving: a Ray Serve application that loads a model folder (docs/contracts.md, sections 3 and 4.4).

decoder.py    continuous batching over one model: pure PyTorch + asyncio, no Ray
sequence.py   one sampled text (Sequence) and its sampling parameters (Sampling)
prefill.py    chunked prefill: primes and scores in slices between decode steps
api.py        requests, validation and errors of the HTTP API; limits.py: the limits
app.py        the text model's Serve deployment (FastAPI ingress), build_app, app_builder for config files
series_app.py the time-series model's deployment (POST /v1/forecast), build_series_app
ingress.py    what both share: JSON errors, the body limit, Serve options, config-file arguments
source.py     the model folder from a path or a pyarrow.fs URI
client.py     CharRNNClient, on requests

Imports models/ and pipeline (vocab, sources) only: never training/."""
