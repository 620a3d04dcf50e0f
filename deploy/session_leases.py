"""A model replica's side of sessions (deploy/sessions.py keeps them): a request takes its session's
state and a lease, runs from that context, and gives the session back holding what the request's
`session_append` says, or unchanged if the request failed or its client left."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from deploy.api import APIError, SessionUse
from deploy.limits import RETRY_AFTER_S
from deploy.state_cache import Context
from deploy.state_format import StateError, decode_state, encode_state, model_fingerprint


def _stored(answer: dict) -> dict:
    """A SessionStore answer, or its error raised as the API's."""
    if "error" in answer:
        status, message = answer["error"]
        raise APIError(status, message, "session",
                       headers={"Retry-After": str(RETRY_AFTER_S)} if status in (409, 429) else None,
                       reason="session_limit" if status == 429 else None)
    return answer


@dataclass
class Lease:
    """A session a request holds: what it continues from, and how far."""
    use: SessionUse
    context: Context
    length: int
    token: str


class Sessions:
    def __init__(self, store, decoder, model, ids):
        """`store`: SessionStore's deployment handle; `ids`: text -> the model's ids."""
        self.store, self.decoder, self.model, self.ids = store, decoder, model, ids
        self.fingerprint = model_fingerprint(model)

    def decode(self, data: bytes) -> tuple[Context, int]:
        """(context, length) from exported state bytes, or the API's error (400, 422)."""
        try:
            return decode_state(data, self.model, self.fingerprint)
        except StateError as err:
            raise APIError(err.status, str(err), reason="invalid_state" if err.status == 422 else None) from None

    async def create(self, context: Context, length: int) -> dict:
        state = encode_state(context, self.model, self.fingerprint, length)
        return _stored(await self.store.create.remote(self.fingerprint, state, length))

    async def ask(self, method: str, sid: str) -> dict:
        """SessionStore's info, delete or export of session `sid`."""
        return _stored(await getattr(self.store, method).remote(sid, self.fingerprint))

    async def take(self, use: SessionUse | None) -> Lease | None:
        if use is None:
            return None
        got = _stored(await self.store.take.remote(use.id, self.fingerprint))
        context, length = decode_state(got["state"], self.model, self.fingerprint)
        return Lease(use, context, length, got["lease"])

    async def give_back(self, lease: Lease | None, prime: str, seq) -> dict | None:
        """End the lease of a request that finished: the session then holds what its
        `session_append` says. `seq`: the request's (first) sequence."""
        if lease is None:
            return None
        state, length = None, lease.length
        if lease.use.append != "none":
            context = seq.context or await self.decoder.context(self.ids(prime), lease.context)
            length += len(prime)
            if lease.use.append == "all" and seq.text:
                context = await self.decoder.context(self.ids(seq.text), context)
                length += len(seq.text)
            state = encode_state(context, self.model, self.fingerprint, length)
        return _stored(await self.store.put.remote(lease.use.id, lease.token, state, length))

    def release(self, lease: Lease | None) -> None:
        """Give the session back unchanged, even from a request being cancelled."""
        if lease is not None:
            asyncio.ensure_future(self.store.put.remote(lease.use.id, lease.token, None, lease.length))
