"""Where sessions live: SessionStore, a one-replica Serve deployment beside the model's, holding each
session's state as bytes (deploy/state_format.py). Any model replica can continue any session, and
a session outlives the replica that made it: no sticky routing.

A request takes a session (a lease), runs, and puts the new state back or releases it unchanged; a
second request on a session already taken is refused (409), as is a lease older than LEASE_S,
which a replica that died mid-request leaves behind, past that time it can be taken again.

Limits: sessions idle for `ttl_s` are dropped; at most `max_sessions` and `max_bytes` of states
(429 beyond). Answers are dicts, errors {"error": [status, message]}: they cross the handle as data."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from ray import serve

from deploy.metrics import SessionMetrics

LEASE_S = 600.0


@dataclass
class _Session:
    model: str  # the fingerprint of the weights its state belongs to
    state: bytes
    length: int
    created: float = field(default_factory=time.time)
    used: float = field(default_factory=time.monotonic)
    lease: str | None = None
    leased_at: float = 0.0


def _error(status: int, message: str) -> dict:
    return {"error": [status, message]}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class SessionStore:
    def __init__(self, max_sessions: int, ttl_s: int, max_bytes: int, model: str = ""):
        """`model`: the served model's name, as the metrics label it."""
        self.max_sessions, self.ttl_s, self.max_bytes = max_sessions, ttl_s, max_bytes
        self._sessions: dict[str, _Session] = {}
        self._bytes = 0
        self._metrics = SessionMetrics(model)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self._sessions.items() if s.lease is None and now - s.used > self.ttl_s]:
            self._drop(sid)

    def _drop(self, sid: str) -> None:
        self._bytes -= len(self._sessions.pop(sid).state)
        self._metrics.held(len(self._sessions), self._bytes)

    def _find(self, sid: str, model: str) -> _Session | dict:
        self._expire()
        session = self._sessions.get(sid)
        if session is None:
            return _error(404, "no such session (never made, deleted, or expired after its idle time)")
        if session.model != model:
            return _error(422, "the session belongs to another model")
        return session

    def create(self, model: str, state: bytes, length: int) -> dict:
        self._expire()
        if len(self._sessions) >= self.max_sessions:
            return _error(429, f"the server holds its limit of {self.max_sessions} sessions; delete some")
        if self._bytes + len(state) > self.max_bytes:
            return _error(429, f"the server's sessions hold their limit of {self.max_bytes} bytes; delete some")
        sid = "sess_" + secrets.token_urlsafe(18)
        self._sessions[sid] = _Session(model, state, length)
        self._bytes += len(state)
        self._metrics.held(len(self._sessions), self._bytes)
        return self._info(sid)

    def take(self, sid: str, model: str) -> dict:
        """The state and a lease, or 409 while another request holds it."""
        session = self._find(sid, model)
        if isinstance(session, dict):
            return session
        if session.lease is not None and time.monotonic() - session.leased_at < LEASE_S:
            return _error(409, "the session is in use by another request; retry when it has finished")
        session.lease, session.leased_at = secrets.token_hex(8), time.monotonic()
        return {"state": session.state, "length": session.length, "lease": session.lease}

    def put(self, sid: str, lease: str, state: bytes | None, length: int) -> dict:
        """End a lease, storing `state` (None: unchanged)."""
        session = self._sessions.get(sid)
        if session is None or session.lease != lease:
            return _error(409, "the session was deleted or taken over while the request ran")
        if state is not None:
            self._bytes += len(state) - len(session.state)
            session.state, session.length = state, length
            self._metrics.held(len(self._sessions), self._bytes)
        session.lease, session.used = None, time.monotonic()
        return self._info(sid)

    def info(self, sid: str, model: str) -> dict:
        session = self._find(sid, model)
        return session if isinstance(session, dict) else self._info(sid)

    def export(self, sid: str, model: str) -> dict:
        session = self._find(sid, model)
        return session if isinstance(session, dict) else {"state": session.state}

    def delete(self, sid: str, model: str) -> dict:
        session = self._find(sid, model)
        if isinstance(session, dict):
            return session
        self._drop(sid)
        return {"session": sid, "object": "session", "deleted": True}

    def stats(self) -> dict:
        self._expire()
        return {"sessions": len(self._sessions), "bytes": self._bytes, "max_sessions": self.max_sessions,
                "max_bytes": self.max_bytes, "ttl_s": self.ttl_s}

    def _info(self, sid: str) -> dict:
        s, now = self._sessions[sid], time.monotonic()
        return {"session": sid, "object": "session", "length": s.length, "created": int(s.created),
                "idle_s": round(now - s.used, 3), "expires_in_s": round(max(0.0, self.ttl_s - (now - s.used)), 3),
                "in_use": s.lease is not None}
