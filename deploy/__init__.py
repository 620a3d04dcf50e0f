"""Serving: a Ray Serve application that loads a model folder (docs/contracts.md, section 3).

decoder.py  continuous batching over one model: pure PyTorch + asyncio, no Ray
api.py      requests, validation and errors of the HTTP API; limits.py: the limits
app.py      the Serve deployment (FastAPI ingress), build_app, app_builder for config files
source.py   the model folder from a path or a pyarrow.fs URI
client.py   CharRNNClient, on requests

Imports models/ and pipeline.vocab only: never training/."""
