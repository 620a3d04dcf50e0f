"""A context as bytes: the state format of sessions (docs/contracts.md, section 3.1).

safetensors, no pickle: tensors `h` [layers, hidden] (and `c` for an LSTM) and `logits` [vocab], all
float32; metadata `format` "charrnn-state", `format_version` "1", `model` (the fingerprint of the
weights that made it: model_fingerprint), `cell`, `layers`, `hidden`, `vocab_size`, `length` (the
characters read). A state is only ever read into the model that wrote it."""
from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from deploy.state_cache import Context

FORMAT, VERSION = "charrnn-state", "1"


class StateError(ValueError):
    """Bytes that are not a state of this model: `status` 400 (not a state at all) or 422 (another
    model's, or another version's)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the network's tensors (names, shapes, values): the same weights, the same
    fingerprint, on any machine, whatever folder they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _identity(model) -> dict[str, str]:
    cfg = model.config
    return {"cell": cfg.cell, "layers": str(cfg.layers), "hidden": str(cfg.hidden), "vocab_size": str(cfg.vocab_size)}


def encode_state(context: Context, model, fingerprint: str, length: int) -> bytes:
    state = context.state if isinstance(context.state, tuple) else (context.state,)
    tensors = {name: part[:, 0].float().cpu().contiguous() for name, part in zip("hc", state)}
    tensors["logits"] = context.logits[0].float().cpu().contiguous()
    meta = {"format": FORMAT, "format_version": VERSION, "model": fingerprint, **_identity(model),
            "length": str(length)}
    return save_tensors(tensors, metadata=meta)


def _metadata(data: bytes) -> dict:
    """The safetensors header's __metadata__, read without trusting the bytes."""
    if len(data) < 8:
        raise StateError(400, "the state is not a safetensors file: too short")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise StateError(400, "the state is not a safetensors file: its header runs past the end")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, ValueError):
        raise StateError(400, "the state is not a safetensors file: its header is not JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def decode_state(data: bytes, model, fingerprint: str) -> tuple[Context, int]:
    """(the context, the characters read) from `encode_state`'s bytes, checked against `model`."""
    meta = _metadata(data)
    if meta.get("format") != FORMAT:
        raise StateError(400, f"the bytes are not a {FORMAT} (format {meta.get('format')!r})")
    if meta.get("format_version") != VERSION:
        raise StateError(422, f"state format version {meta.get('format_version')!r} is not supported "
                              f"(this server reads {VERSION})")
    if meta.get("model") != fingerprint or any(meta.get(k) != v for k, v in _identity(model).items()):
        raise StateError(422, "the state belongs to another model (its weights' fingerprint differs)")
    try:
        tensors = load_tensors(data)
        length = int(meta.get("length", ""))
    except (SafetensorError, ValueError) as err:
        raise StateError(400, f"the state cannot be read: {err}") from None
    cfg, names = model.config, ("h", "c") if model.config.cell == "lstm" else ("h",)
    shapes = {**{n: (cfg.layers, cfg.hidden) for n in names}, "logits": (cfg.vocab_size,)}
    if set(tensors) != set(shapes) or any(tuple(tensors[n].shape) != s or tensors[n].dtype != torch.float32
                                          for n, s in shapes.items()):
        raise StateError(422, f"the state's tensors do not fit this model: want {shapes} in float32")
    if not all(bool(t.isfinite().all()) for t in tensors.values()) or length < 1:
        raise StateError(422, "the state holds a non-finite value or a length below 1")
    device = model.head.weight.device
    parts = tuple(tensors[n][:, None].to(device, model.head.weight.dtype).contiguous() for n in names)
    state = parts if cfg.cell == "lstm" else parts[0]
    return Context(state, tensors["logits"][None].to(device, model.head.weight.dtype)), length
