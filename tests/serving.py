"""What the text-serving tests share: their limits, a tiny model trained in a plain loop for a few
seconds (no Ray Train), and HTTP helpers."""
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import requests
import torch
import torch.nn.functional as F

from conftest import REPO, write_story_corpus
from models import CharRNN, ModelConfig, save_model
from pipeline.text.vocab import Vocabulary

LIMITS = dict(max_prime_chars=300, max_chars=400, max_n=4, max_score_chars=2000, max_body_bytes=8192,
              max_concurrent=48, max_queued=64, max_queued_chars=4000)
DECODER = dict(flush_chars=8, log_interval_s=0.2)  # small chunks and frequent log lines, for the tests
PRIME = "The cat "


def train_story_model(tmp: Path) -> Path:
    """TMP/run/model: a 2x48 LSTM that has learned the story grammar (about 100 Adam steps)."""
    text = write_story_corpus(tmp / "story.txt", 30_000)
    vocab = Vocabulary.from_counts(Counter(map(ord, text)))
    ids = torch.from_numpy(vocab.encode(text).astype("int64"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine are far slower than one
    try:
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=vocab.size, layers=2, hidden=48, dropout=0.0)
        model = CharRNN(config)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(100):
            starts = torch.randint(len(ids) - 49, (32,), generator=g)
            batch = torch.stack([ids[s : s + 49] for s in starts])
            logits, _ = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab.size), batch[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 1.0, loss.item()
    save_model(model, config, vocab.to_json(), tmp / "run" / "model", info={"step": 100})
    return tmp / "run"


def post(url, path, body, headers=None, **kw) -> requests.Response:
    """`body` (an object, or raw JSON text) sent as a JSON client sends it."""
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **(headers or {})}
    return requests.post(url + path, data=data, headers=headers, timeout=120, **kw)


def sse(response: requests.Response) -> list:
    """Every `data:` event of a Server-Sent Events body, JSON-decoded ([DONE] as the string)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def start_serve(*args, env: dict | None = None) -> tuple[subprocess.Popen, list]:
    """`charrnn serve ARGS` in its own process, once it has printed the last line of its start-up
    (the metrics URL, after the serving line and the example commands): (the process, its output
    lines, stderr included, which a thread goes on reading so that Ray's logs never fill the
    pipe). Fails if it exits before."""
    ready = "  Prometheus metrics:"
    proc = subprocess.Popen([sys.executable, "-m", "charrnn", "serve", *map(str, args)], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, came_up = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(ready):
                came_up.set()
        came_up.set()  # it exited

    threading.Thread(target=read, daemon=True).start()
    came_up.wait()
    assert any(line.startswith(ready) for line in lines), "charrnn serve did not come up:\n" + "".join(lines[-30:])
    return proc, lines
