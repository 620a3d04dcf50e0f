"""A small Python client for the HTTP API (docs/contracts.md, sections 3 and 4.4), on `requests`.

    client = CharRNNClient("http://127.0.0.1:8000")
    client.generate("The ", max_chars=200, top_k=5, seed=1)["text"]
    for chunk in client.stream("The ", max_chars=200):
        print(chunk, end="", flush=True)
    client.forecast([0.0, 0.1, 0.2], steps=5)["forecast"]   # a time-series model

Every error answer raises ServerError, carrying the server's status, message and parameter."""
from __future__ import annotations

import json
from collections.abc import Iterator

import requests


class ServerError(Exception):
    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 retry_after: str | None = None):
        super().__init__(f"HTTP {status}{f' ({param})' if param else ''}: {message}")
        self.status, self.message, self.type, self.param, self.retry_after = status, message, type, param, retry_after


class CharRNNClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 300.0,
                 session: requests.Session | None = None, api_key: str | None = None):
        """`api_key`: for a server started with one (sent as Authorization: Bearer)."""
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = session or requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.last: dict | None = None  # stream(): the final event (finish_reason, chars, seed)

    def _request(self, method: str, path: str, body: dict | None = None, stream: bool = False) -> requests.Response:
        response = self.session.request(method, self.url + path, json=body, timeout=self.timeout, stream=stream)
        if response.status_code >= 400:
            _raise(response)
        return response

    def generate(self, prime: str, max_chars: int = 200, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 session: str | None = None, session_append: str | None = None) -> dict:
        """{text, chars, finish_reason, seed, model}, and `session` (its info) when continuing one."""
        return self._request("POST", "/v1/generate", _body(locals())).json()

    def stream(self, prime: str, max_chars: int = 200, temperature: float = 1.0, top_k: int | None = None,
               top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
               session: str | None = None, session_append: str | None = None) -> Iterator[str]:
        """The generated text in chunks, as the server sends them; then `self.last` holds the final
        event ({text: "", finish_reason, chars, seed})."""
        body = {**_body(locals()), "stream": True}
        self.last = None
        with self._request("POST", "/v1/generate", body, stream=True) as response:
            for event in _sse_events(response):
                if "error" in event:
                    raise ServerError(500, event["error"].get("message", "stream failed"), event["error"].get("type"))
                if "finish_reason" in event:
                    self.last = event
                elif event.get("text"):
                    yield event["text"]

    def completions(self, prompt: str | list[str], max_tokens: int = 16, **options) -> dict:
        """OpenAI-style completions; options: temperature, top_p, top_k, n, seed, stop, echo, model."""
        return self._request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, **options}).json()

    def score(self, text: str, per_char: bool = False) -> dict:
        """{loss (nats per character), bits_per_char, chars (characters predicted)}; with `per_char`
        also `tokens` and `surprisal` (nats per character, the first None)."""
        return self._request("POST", "/v1/score", {"text": text, "per_char": per_char}).json()

    def create_session(self, prime: str) -> str:
        """A new session after `prime`: its id, for generate(session=...) and the calls below."""
        return self._request("POST", "/v1/sessions", {"prime": prime}).json()["session"]

    def session_info(self, session: str) -> dict:
        """{session, length, created, idle_s, expires_in_s, in_use, model}."""
        return self._request("GET", f"/v1/sessions/{session}").json()

    def delete_session(self, session: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session}")

    def export_state(self, session: str) -> bytes:
        """The session's state (safetensors bytes), for import_state here or on another server."""
        return self._request("GET", f"/v1/sessions/{session}/state").content

    def import_state(self, state: bytes) -> str:
        """A new session holding `state` (export_state's bytes, of this server's model): its id."""
        response = self.session.post(self.url + "/v1/sessions", data=state, timeout=self.timeout,
                                     headers={"Content-Type": "application/octet-stream"})
        if response.status_code >= 400:
            _raise(response)
        return response.json()["session"]

    def forecast(self, history: list, steps: int = 1) -> dict:
        """A time-series model's next `steps` points after `history` (numbers, or arrays of one
        number per feature): {forecast, steps, model}, `forecast` shaped like `history`."""
        return self._request("POST", "/v1/forecast", {"history": _plain(history), "steps": steps}).json()

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models").json()["data"]]

    def stats(self) -> dict:
        return self._request("GET", "/v1/stats").json()


def _body(args: dict) -> dict:
    return {k: v for k, v in args.items() if k != "self" and v is not None}


def _plain(values) -> list:
    """Lists of Python numbers from a numpy array (or anything with tolist) as well as from lists."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _raise(response: requests.Response):
    try:
        error = response.json()["error"]
        message, type_, param = error["message"], error.get("type"), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, type_, param = response.text.strip()[:500] or response.reason, None, None
    raise ServerError(response.status_code, message, type_, param, response.headers.get("Retry-After"))


def _sse_events(response: requests.Response) -> Iterator[dict]:
    """The JSON of each `data:` line of a Server-Sent Events body, as it arrives."""
    for line in response.iter_lines(chunk_size=None):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)
