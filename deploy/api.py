"""The HTTP API's requests and errors (docs/contracts.md, sections 3 and 4.4), without any web
framework: JSON bytes in, validated requests out, or an APIError that says which parameter is wrong.

400: the body is not a JSON object, a field has the wrong type, or a field is unknown.
422: a field has the right type but a value out of range (the message names it, `param` too)."""
from __future__ import annotations

import json
import math
import re
import dataclasses
from dataclasses import dataclass

import numpy as np

from deploy.sampling import Sampling
from deploy.limits import Limits, SeriesLimits
from pipeline.text.vocab import normalize_newlines

MAX_TEMPERATURE = 100.0  # already next to uniform; float32 must hold 1 / temperature
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 64
MAX_LOGPROBS = 5  # alternatives per character, as OpenAI's legacy completions
SESSION_APPEND = ("all", "input", "none")  # what a request adds to its session: see SessionUse
MAX_SESSION_ID = 64
# OpenAI completion parameters this server accepts only at their "off" value.
OPENAI_OFF = {"suffix": (None, ""), "presence_penalty": (None, 0),
              "frequency_penalty": (None, 0), "logit_bias": (None, {}), "best_of": (None, 1)}


class APIError(Exception):
    """An error answer: HTTP `status` and the body {"error": {"message", "type", "param"}}."""
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 409: "invalid_request_error", 413: "request_too_large",
             415: "invalid_request_error", 422: "invalid_request_error", 429: "overloaded_error",
             500: "internal_error", 503: "unavailable_error"}

    # Why a request was refused, as the rejections metric counts it (deploy/metrics.py): a few fixed
    # words, never the user's text, so that the metric's label values stay few.
    REASONS = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               409: "session_busy", 413: "body_too_large", 415: "unsupported_media_type", 429: "overloaded"}

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        # a 422 names the field this API's parser read (never an unknown one's name, which is a 400)
        self.reason = reason or (f"invalid_{param}" if status == 422 and param else self.REASONS.get(status, "error"))

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"), "param": self.param}}


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object (strict JSON: no NaN or Infinity)."""
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    return body


class _Fields:
    """Typed access to a JSON object's fields; whatever is left unread is an unknown field."""

    KINDS = {"string": str, "boolean": bool, "integer": int, "number": (int, float), "array": list, "object": dict}

    def __init__(self, body: dict):
        self.body, self.read = body, set()

    def get(self, name: str, kind: str, default=None, nullable: bool = True):
        self.read.add(name)
        value = self.body.get(name, default)
        if value is None and nullable:
            return default
        if isinstance(value, bool) and kind != "boolean" or not isinstance(value, self.KINDS[kind]):
            raise APIError(400, f"'{name}' must be {'an' if kind[0] in 'ai' else 'a'} {kind}"
                                f"{' or null' if nullable else ''}, got {_json_type(value)}", name)
        return value

    def check_unknown(self) -> None:
        for name in self.body:
            if name not in self.read:
                raise APIError(400, f"unrecognized request argument: '{name}'", name)


def _json_type(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _range(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise APIError(422, f"'{name}' {message}", name)


def clean_text(text: str) -> str:
    """Newlines as in the corpus (CRLF and CR read as LF). JSON can also carry lone UTF-16
    surrogates (\\ud800), which are no characters: they read as U+FFFD."""
    return re.sub("[\ud800-\udfff]", "\ufffd", normalize_newlines(text))


def _required_text(f: _Fields, name: str, limit: int) -> str:
    if f.body.get(name) is None:
        f.read.add(name)
        raise APIError(400, f"'{name}' is required", name)
    return _check_text(name, f.get(name, "string", nullable=False), limit)


def _check_text(name: str, text: str, limit: int, empty_ok: bool = False) -> str:
    text = clean_text(text)
    _range(empty_ok or len(text) > 0, name, "must not be empty")
    _range(len(text) <= limit, name, f"is {len(text)} characters long; the limit is {limit}")
    return text


def _sampling(f: _Fields, limits: Limits, length_name: str, length_default: int, greedy_ok: bool) -> Sampling:
    max_chars = f.get(length_name, "integer", length_default)
    _range(0 <= max_chars <= limits.max_chars, length_name, f"must be in [0, {limits.max_chars}], got {max_chars}")
    temperature = f.get("temperature", "number", 1.0)
    low = "0 <=" if greedy_ok else "0 <"
    _range((temperature >= 0 if greedy_ok else temperature > 0) and temperature <= MAX_TEMPERATURE and
           math.isfinite(temperature), "temperature",
           f"must satisfy {low} temperature <= {MAX_TEMPERATURE:g}, got {temperature}")
    top_k = f.get("top_k", "integer")
    _range(top_k is None or top_k >= 1, "top_k", f"must be >= 1 (or null: no top-k), got {top_k}")
    top_p = f.get("top_p", "number", 1.0)
    _range(0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p}")
    seed = f.get("seed", "integer")
    _range(seed is None or SEED_RANGE[0] <= seed <= SEED_RANGE[1], "seed", "must fit a signed 64-bit integer")
    stop = f.body.get("stop")
    f.read.add("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string, an array of strings or null", "stop")
    _range(len(stop) <= MAX_STOP, "stop", f"holds {len(stop)} strings; the limit is {MAX_STOP}")
    stop = [clean_text(s) for s in stop]
    _range(all(0 < len(s) <= MAX_STOP_CHARS for s in stop), "stop",
           f"strings must be 1 to {MAX_STOP_CHARS} characters long")
    return Sampling(max_chars, float(temperature), top_k, float(top_p), seed, tuple(stop))


@dataclass(frozen=True)
class SessionUse:
    """A request that continues session `id`: it reads its prime or prompt from the session's state,
    then the session holds what `append` says: "all" (the prime or prompt and the generated text),
    "input" (the prime or prompt only) or "none" (unchanged: a branch that leaves no trace)."""
    id: str
    append: str


def parse_session_id(value) -> str:
    if not isinstance(value, str):
        raise APIError(400, f"'session' must be a string, got {_json_type(value)}", "session")
    _range(0 < len(value) <= MAX_SESSION_ID, "session", f"must be 1 to {MAX_SESSION_ID} characters long")
    return value


def _session_use(f: _Fields) -> SessionUse | None:
    session = f.get("session", "string")
    append = f.get("session_append", "string", "all")
    _range(append in SESSION_APPEND, "session_append", f"must be one of {', '.join(SESSION_APPEND)}, got {append!r}")
    if session is None:
        _range("session_append" not in f.body or f.body["session_append"] is None, "session_append",
               "needs a 'session'")
        return None
    return SessionUse(parse_session_id(session), append)


def _input_text(f: _Fields, name: str, limit: int, session: SessionUse | None) -> str:
    """A prime or prompt: required, unless the request continues a session (then it may be empty)."""
    if session is None:
        return _required_text(f, name, limit)
    return _check_text(name, f.get(name, "string", ""), limit, empty_ok=True)


@dataclass(frozen=True)
class GenerateRequest:
    prime: str
    sampling: Sampling
    stream: bool
    session: SessionUse | None = None


def parse_generate(body: dict, limits: Limits) -> GenerateRequest:
    """POST /v1/generate {prime, max_chars, temperature, top_k, top_p, seed, stop, stream, session,
    session_append}."""
    f = _Fields(body)
    session = _session_use(f)
    prime = _input_text(f, "prime", limits.max_prime_chars, session)
    sampling = _sampling(f, limits, "max_chars", 200, greedy_ok=False)
    stream = f.get("stream", "boolean", False)
    f.check_unknown()
    return GenerateRequest(prime, sampling, stream, session)


def parse_session(body: dict, limits: Limits) -> str:
    """POST /v1/sessions {prime}: the text a new session starts from."""
    f = _Fields(body)
    prime = _required_text(f, "prime", limits.max_prime_chars)
    f.check_unknown()
    return prime


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str]
    n: int
    sampling: Sampling  # seed: choice i of a prompt uses seed + i
    stream: bool
    echo: bool
    include_usage: bool
    logprobs: int | None = None
    session: SessionUse | None = None


def parse_completion(body: dict, limits: Limits, model_name: str) -> CompletionRequest:
    """POST /v1/completions, as OpenAI's (max_tokens counts characters; temperature 0 is greedy)."""
    f = _Fields(body)
    model = f.get("model", "string")
    if model is not None and model != model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server has '{model_name}'", "model")
    session = _session_use(f)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        f.read.add("prompt")
        prompts = [_check_text("prompt", p, limits.max_prime_chars) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise APIError(422, "'prompt' as token ids is not supported: send text (one token is one character)",
                       "prompt")
    elif isinstance(prompt, list):
        raise APIError(422 if not prompt else 400, "'prompt' must be a string or a non-empty array of strings",
                       "prompt")
    else:
        prompts = [_input_text(f, "prompt", limits.max_prime_chars, session)]
    n = f.get("n", "integer", 1)
    _range(1 <= n <= limits.max_n, "n", f"must be in [1, {limits.max_n}], got {n}")
    _range(n * len(prompts) <= limits.max_n, "n",
           f"times the {len(prompts)} prompts asks for {n * len(prompts)} sequences; the limit is {limits.max_n}")
    sampling = _sampling(f, limits, "max_tokens", 16, greedy_ok=True)
    stream = f.get("stream", "boolean", False)
    echo = f.get("echo", "boolean", False)
    options = f.get("stream_options", "object") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "'stream_options.include_usage' must be a boolean", "stream_options")
    f.get("user", "string")
    logprobs = f.get("logprobs", "integer")
    _range(logprobs is None or 0 <= logprobs <= MAX_LOGPROBS, "logprobs",
           f"must be in [0, {MAX_LOGPROBS}] or null, got {logprobs}")
    for name, off in OPENAI_OFF.items():
        f.read.add(name)
        _range(body.get(name) in off, name, f"is not supported by this server (only {off[-1]!r} or null)")
    f.check_unknown()
    if session is not None:
        _range(len(prompts) == 1, "prompt", "must be one string when the request continues a session")
        _range(n == 1 or session.append != "all", "n",
               "must be 1 when the generated text joins the session (session_append 'all')")
        _range(not (echo and logprobs is not None), "echo",
               "with logprobs scores the prompt from the start: it cannot continue a session")
    sampling = dataclasses.replace(sampling, logprobs=logprobs)
    return CompletionRequest(prompts, n, sampling, stream, echo, include_usage, logprobs, session)


@dataclass(frozen=True)
class ScoreRequest:
    text: str
    per_char: bool  # also each character's surprisal


def parse_score(body: dict, limits: Limits) -> ScoreRequest:
    """POST /v1/score {text, per_char}: at least two characters (the first is only context)."""
    f = _Fields(body)
    text = _required_text(f, "text", limits.max_score_chars)
    _range(len(text) >= 2, "text", "must hold at least two characters: each is predicted from the ones before")
    per_char = f.get("per_char", "boolean", False)
    f.check_unknown()
    return ScoreRequest(text, per_char)


@dataclass(frozen=True)
class ForecastRequest:
    history: np.ndarray  # [points, features], float64, data units
    steps: int
    flat: bool  # history came as plain numbers: answer the forecast the same way


def parse_forecast(body: dict, limits: SeriesLimits, features: int) -> ForecastRequest:
    """POST /v1/forecast {history, steps} for a model of `features` features. history: an array of
    numbers (one feature per point) or of equal-length arrays of numbers (one per feature)."""
    f = _Fields(body)
    if f.body.get("history") is None:
        f.read.add("history")
        raise APIError(400, "'history' is required", "history")
    history = f.get("history", "array", nullable=False)
    flat = all(_is_number(v) for v in history)
    if not flat and not (all(isinstance(p, list) and all(_is_number(v) for v in p) for p in history)
                         and len({len(p) for p in history}) == 1):
        raise APIError(400, "'history' must be an array of numbers or of equal-length arrays of numbers",
                       "history")
    _range(len(history) > 0, "history", "must not be empty")
    _range(len(history) <= limits.max_history, "history",
           f"holds {len(history)} points; the limit is {limits.max_history}")
    width = 1 if flat else len(history[0])
    _range(width == features, "history", f"points have {width} feature(s); this model needs {features}")
    try:
        values = np.array(history, dtype=np.float64).reshape(len(history), features)
    except OverflowError:  # an integer beyond any float
        values = None
    _range(values is not None and np.isfinite(values).all(), "history", "holds a number too large for a float")
    steps = f.get("steps", "integer", 1)
    _range(1 <= steps <= limits.max_forecast_steps, "steps",
           f"must be in [1, {limits.max_forecast_steps}], got {steps}")
    f.check_unknown()
    return ForecastRequest(values, steps, flat)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
