"""charrnn quickstart: the whole stack once, on one machine: prepare, train, serve, query."""
from __future__ import annotations

import math
import socket
import sys
import time
from pathlib import Path

from charrnn.cmd_serve import AppTaken, add_app_options, deploy_app, remove_app
from charrnn.errors import CommandError
from charrnn.ray_session import add_address_option, connect, is_local

# A model that learns the look of Python source within minutes on two CPU cores.
TRAIN_OPTIONS = dict(layers=2, hidden=256, dropout=0.1, batch=32, seq=100, lr=2e-3,
                     val_every=200, val_max_tokens=200_000, checkpoint_every=200, log_every=25)
PRIMES = ("def ", "import ", "class ")


def add_commands(sub) -> None:
    p = sub.add_parser(
        "quickstart", help="prepare, train, serve and query a small model in one go (about 10 minutes on 2 cores)",
        description="The whole stack on one machine: prepare a corpus (default: this Python's standard library), "
                    "train a small LSTM for --minutes, serve it with Ray Serve on 127.0.0.1, ask it for samples "
                    "over HTTP and print them, then shut down (or keep serving).",
    )
    p.add_argument("--out", default="runs/quickstart", metavar="DIR",
                   help="where to write: the prepared data to DIR/data, each quickstart's training run to a new "
                        "DIR/run-N (default runs/quickstart)")
    p.add_argument("--corpus", nargs="+", default=[], metavar="INPUT",
                   help="text to learn, as for `charrnn prepare` (default: the standard library's .py files)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time (default 5)")
    p.add_argument("--hidden", type=int, default=TRAIN_OPTIONS["hidden"],
                   help=f"units per LSTM layer (default {TRAIN_OPTIONS['hidden']})")
    p.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    p.add_argument("--samples", type=int, default=3, help="samples to print (default 3)")
    p.add_argument("--sample-chars", type=int, default=300, help="characters per sample (default 300)")
    p.add_argument("--keep-serving", action="store_true", help="keep serving after the samples, until Ctrl-C")
    add_app_options(p)
    add_address_option(p)
    p.set_defaults(handler=_run_quickstart)


def _run_quickstart(args) -> int:
    from ray import serve

    from deploy.app import build_app
    from deploy.client import CharRNNClient
    from pipeline.text.prepare import PrepareOptions, prepare
    from training.console import quiet_ray_logs
    from training.driver import train

    if args.minutes <= 0:
        raise CommandError("--minutes must be > 0")
    if not 0 < args.port < 65536:
        raise CommandError(f"--port must be in 1..65535, got {args.port}")
    try:
        with socket.create_server(("127.0.0.1", args.port)):
            pass
    except OSError as err:
        raise CommandError(f"cannot listen on 127.0.0.1:{args.port}: {err.strerror or err} (choose another --port)")
    out, started = Path(args.out), time.monotonic()
    run_dir = next(out / f"run-{n}" for n in range(1, 10**6) if not (out / f"run-{n}").exists())
    say = lambda message: print(f"[quickstart {time.monotonic() - started:5.0f}s] {message}", flush=True)
    connect(args.address, args.num_cpus)
    quiet_ray_logs()  # Ray Data's execution lines too: the stages' own lines are the show

    say(f"1/4 preparing {' '.join(args.corpus) or 'the standard library'} into {out / 'data'}")
    # Rare characters (the corpus has a few hundred) share the unknown id: a small softmax learns faster.
    options = PrepareOptions(max_vocab=128, errors="strict" if args.corpus else "replace")
    manifest = prepare(args.corpus, str(out / "data"), options)
    say(f"   {manifest['totals']['chars']:,} characters, vocabulary of {manifest['vocab']['size']}")

    say(f"2/4 training a 2x{args.hidden} LSTM for {args.minutes:g} minutes")
    summary = train([str(out / "data")], str(run_dir),
                    {**TRAIN_OPTIONS, "hidden": args.hidden, "max_minutes": args.minutes}, log=say)
    model = Path(summary["model"])

    url = f"http://127.0.0.1:{args.port}{args.route_prefix.rstrip('/')}"
    say(f"3/4 serving {model} on {url}")
    quiet = {"log_level": "WARNING", "enable_access_log": False}  # the samples, not Serve's logs, are the show
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=quiet)
    deployed = False
    try:
        try:
            deploy_app(build_app(str(model)), args, logging_config=quiet)
        except AppTaken as err:
            raise CommandError(str(err))
        deployed = True
        client = CharRNNClient(url)
        say(f"4/4 asking it for {args.samples} samples over HTTP")
        for i in range(args.samples):
            prime = PRIMES[i % len(PRIMES)]
            text = client.generate(prime, max_chars=args.sample_chars, top_k=5, seed=i)["text"]
            print(f"\n--- sample {i + 1} (prime {prime!r}) ---\n{prime}{text}\n", flush=True)
        print(f"trained {summary['steps']} steps; validation loss {summary['best_val_loss']:.3f} nats/char "
              f"({summary['best_val_loss'] / math.log(2):.2f} bits/char); model in {model}", flush=True)
        print(f"next: charrnn sample --model {run_dir} --prime 'def ' --top-k 5   "
              f"or   charrnn serve --model {run_dir}", flush=True)
        if args.keep_serving:
            say(f"serving on {url} until Ctrl-C: open {url}/ in a browser, or "
                f"charrnn query --url {url} --prime 'def ' --stream")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("charrnn quickstart: shutting down", file=sys.stderr, flush=True)
    finally:
        if deployed or is_local(args.address):
            remove_app(args, is_local(args.address))
    return 0


