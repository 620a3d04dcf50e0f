"""GET / on a text server: the playground page (deploy/playground.html), one self-contained file
that uses only the public API, so every limit and the API key apply to it as to any client. Its
Content-Security-Policy lets the page run its own script and style (named by hash) and talk to this
server, nothing else: nothing is fetched from the internet, and no pasted text can run."""
from __future__ import annotations

import base64
import functools
import hashlib
import re
from pathlib import Path


@functools.cache
def page() -> tuple[str, dict]:
    """(the page, its response headers)."""
    html = Path(__file__).with_name("playground.html").read_text(encoding="utf-8")
    policy = {"default-src": "'none'", "script-src": _hashes(html, "script"), "style-src": _hashes(html, "style"),
              "connect-src": "'self'", "img-src": "'self'", "base-uri": "'none'", "form-action": "'none'",
              "frame-ancestors": "'none'"}
    headers = {"Content-Security-Policy": "; ".join(f"{k} {v}" for k, v in policy.items()),
               "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
    return html, headers


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)
