"""charrnn serve / query: the Ray Serve application (deploy/) and its command-line client."""
from __future__ import annotations

import os
import socket
import sys
import time

from charrnn.errors import CommandError
from charrnn.ray_session import add_address_option, connect, is_local

APP_NAME = "charrnn"
API_KEY_ENV = "CHARRNN_API_KEY"


def add_commands(sub) -> None:
    from deploy.limits import Limits, SeriesLimits

    d, ds = Limits(), SeriesLimits()
    p = sub.add_parser(
        "serve", help="serve a trained model over HTTP with Ray Serve (OpenAI-compatible completions too)",
        description="Serve a model folder over HTTP until Ctrl-C: POST /v1/generate, /v1/completions (OpenAI), "
                    "/v1/score, /v1/sessions; GET /v1/models, /healthz, /v1/stats, and / (a page to try the "
                    "model in a browser). Concurrent requests are decoded together, one batched step for all of "
                    "them (continuous batching). A time-series model folder gets "
                    "POST /v1/forecast, GET /v1/models, /healthz instead, concurrent requests forecast together. "
                    "docs/contracts.md, sections 3 and 4.4, define the API.")
    p.add_argument("--model", required=True, metavar="RUN_DIR",
                   help="a run folder (uses RUN_DIR/model) or a model folder: a local path or a pyarrow.fs URI")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1,
                       help="replicas, each with its own copy of the model (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="scale replicas between MIN and MAX with the load")
    p.add_argument("--target-ongoing", type=float, default=None,
                   help="with --autoscale: requests per replica to aim at (default: half of --max-concurrent)")
    p.add_argument("--gpu", action="store_true", help="place each replica on a GPU")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: --cpus-per-replica)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the run folder's name)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="text models: what decode steps compute in. auto (default): bf16 where the hardware has it "
                        "natively and a start-up probe measures it faster, else fp32. bf16 gives a seed other text "
                        "than fp32 does (primes, scores and states stay fp32)")
    _add_api_key_option(p, "every /v1 route then needs Authorization: Bearer KEY (401 otherwise); /healthz stays open")
    add_app_options(p)
    limits = p.add_argument_group("limits (per request, and per replica)")
    limits.add_argument("--max-prime-chars", type=int, default=d.max_prime_chars,
                        help=f"characters in a prime or prompt (default {d.max_prime_chars})")
    limits.add_argument("--max-chars", type=int, default=d.max_chars,
                        help=f"characters generated per sequence: max_chars, max_tokens (default {d.max_chars})")
    limits.add_argument("--max-n", type=int, default=d.max_n, help=f"sequences per request (default {d.max_n})")
    limits.add_argument("--max-score-chars", type=int, default=d.max_score_chars,
                        help=f"characters of text to /v1/score (default {d.max_score_chars})")
    limits.add_argument("--max-history", type=int, default=ds.max_history,
                        help=f"series models: points of history per request (default {ds.max_history})")
    limits.add_argument("--max-forecast-steps", type=int, default=ds.max_forecast_steps,
                        help=f"series models: points forecast per request (default {ds.max_forecast_steps})")
    limits.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help=f"request body size (default {d.max_body_bytes})")
    limits.add_argument("--max-concurrent", type=int, default=d.max_concurrent,
                        help=f"sequences decoded (series: requests forecast) together per replica, the batch "
                             f"(default {d.max_concurrent})")
    limits.add_argument("--max-queued", type=int, default=d.max_queued,
                        help=f"sequences (series: requests) waiting per replica; beyond, 429 with Retry-After "
                             f"(default {d.max_queued})")
    limits.add_argument("--max-queued-chars", type=int, default=d.max_queued_chars,
                        help=f"characters of primes and scores waiting for the network per replica; beyond, 429 "
                             f"(default {d.max_queued_chars})")
    state = p.add_argument_group("state: the prefix cache and sessions")
    state.add_argument("--state-cache-mb", type=int, default=d.state_cache_mb,
                       help=f"per replica, MiB of model states kept after the primes it ran, so a prime that begins "
                            f"with one runs only the rest (default {d.state_cache_mb}; 0: off)")
    state.add_argument("--max-sessions", type=int, default=d.max_sessions,
                       help=f"sessions the server keeps; beyond, 429 (default {d.max_sessions})")
    state.add_argument("--max-session-mb", type=int, default=d.max_session_mb,
                       help=f"MiB of session states the server keeps; beyond, 429 (default {d.max_session_mb})")
    state.add_argument("--session-ttl-s", type=int, default=d.session_ttl_s,
                       help=f"seconds a session may sit unused before it is dropped (default {d.session_ttl_s})")
    add_address_option(p)
    p.set_defaults(handler=_run_serve)

    p = sub.add_parser("query", help="ask a running `charrnn serve` for text",
                       description="POST /v1/generate to a charrnn server and print the prime and the text.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--prime", default="The", help="text to start from (default 'The')")
    p.add_argument("--max-chars", type=int, default=200, help="characters to generate (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0 (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help=">= 1: sample among the k likeliest (default: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]: nucleus sampling (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text (default: random)")
    p.add_argument("--stop", action="append", default=None, help="stop before this string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server (default 300)")
    _add_api_key_option(p, "for a server started with one")
    p.set_defaults(handler=_run_query)


def _add_api_key_option(p, what: str) -> None:
    # The environment variable first: a key on the command line is visible to every user in `ps`.
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                   help=f"API key (default: ${API_KEY_ENV}, which keeps it out of `ps`): {what}")


def add_app_options(p) -> None:
    """How a command's Serve application shares a cluster with others (deploy_app, remove_app)."""
    p.add_argument("--app-name", default=APP_NAME,
                   help=f"the Serve application's name (default {APP_NAME}); one per model on a shared cluster")
    p.add_argument("--route-prefix", default="/", help="the URL path the application answers under (default /)")
    p.add_argument("--replace", action="store_true",
                   help="replace a running Serve application of that name (default: refuse, exit 2)")


class AppTaken(ValueError):
    """Another application holds the name or the route prefix."""


def deploy_app(app, args, **run_options) -> None:
    """serve.run `app` as --app-name at --route-prefix, unless an application of that name already
    runs there and --replace was not given. Raises AppTaken, or the deployment's error."""
    from ray import serve

    if args.app_name in serve.status().applications and not args.replace:
        raise AppTaken(f"a Serve application named {args.app_name!r} is already running on this cluster; "
                       f"choose another --app-name, or --replace it")
    try:
        serve.run(app, name=args.app_name, route_prefix=args.route_prefix, **run_options)
    except Exception as err:  # the controller's error arrives wrapped: its last line is the reason
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if "is being used by application" in reason:
            raise AppTaken(f"{reason} (choose another --route-prefix)") from None
        raise


def remove_app(args, local: bool) -> None:
    """Take down what this command deployed: its own local Ray's Serve whole, or on a cluster only
    its application, never the others'."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if local:
        serve.shutdown()
    else:
        serve.delete(args.app_name)




def _run_serve(args) -> int:
    from ray import serve

    task, app = _application(args)
    local = is_local(args.address)
    if local:
        _prepare_this_machine(args, task)
    deployed = False
    try:
        connect(args.address, args.num_cpus)
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            deploy_app(app, args)
        except AppTaken as err:
            raise CommandError(str(err))
        deployed = True
        _announce(args, task, local)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("charrnn serve: shutting down", file=sys.stderr, flush=True)
    finally:
        if deployed or local:
            remove_app(args, local)
    return 0


def _application(args):
    """(the model's task, its Serve application built from the options), or a one-line error."""
    from deploy import source
    from deploy.app import build_app
    from deploy.ingress import api_key_digest, parse_autoscale
    from deploy.limits import LIMIT_NAMES, limits_for
    from deploy.series_app import build_series_app

    try:
        task = source.task(source.resolve(args.model))
        limits = limits_for(task, {name: getattr(args, name) for name in LIMIT_NAMES})
        autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        if task == "series" and args.precision != "auto":
            raise ValueError("--precision applies to text models only")
        text_only = {"precision": args.precision} if task == "text" else {}
        app = (build_series_app if task == "series" else build_app)(
            args.model, name=args.name, replicas=args.replicas, autoscale=autoscale, target_ongoing=args.target_ongoing,
            gpu=args.gpu, num_cpus=args.cpus_per_replica, threads=args.threads, limits=limits,
            api_key_sha256=api_key_digest(args.api_key) if args.api_key else None, **text_only)
    except ValueError as err:  # ModelFolderError is one too: it names the folder
        raise CommandError(str(err))
    return task, app


def _prepare_this_machine(args, task: str) -> None:
    """A local Ray runs the replicas and the proxy on this machine: refuse, before starting it, a
    precision its CPU cannot decode in or a port already taken; and have the proxy answer 503, not
    a bare 500, when a replica dies holding a request."""
    if task == "text" and not args.gpu and args.precision != "auto":
        from models import require_precision

        require_precision(args.precision, "cpu")
    try:
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as err:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    from deploy.proxy import PROXY_ENV

    for key, value in PROXY_ENV.items():
        os.environ.setdefault(key, value)


def _announce(args, task: str, local: bool) -> None:
    """Where it serves, a request to try, and where its metrics are."""
    from storage import public_location

    url = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
    print(f"charrnn serve: serving {public_location(args.model)} at {url} "
          f"({f'autoscaling {args.autoscale}' if args.autoscale else f'{args.replicas} replica(s)'}); Ctrl-C stops",
          flush=True)
    curl = "curl -s -H 'Content-Type: application/json'" + \
        (f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if args.api_key else "")
    if task == "series":
        print(f"  {curl} {url}/v1/forecast -d '{{\"history\": [0.0, 0.1, 0.2], \"steps\": 10}}'", flush=True)
    else:
        print(f"  {curl} {url}/v1/generate -d '{{\"prime\": \"The \", \"max_chars\": 200, \"seed\": 1}}'\n"
              f"  charrnn query --url {url} --prime 'The ' --stream\n"
              f"  playground (in a browser): {url}/", flush=True)
    print(f"  Prometheus metrics: {_metrics_url() if local else 'every node of the cluster (docs/cluster.md)'}",
          flush=True)


def _metrics_url() -> str:
    """Where this machine's Ray agent exports the replicas' metrics (docs/contracts.md, section 3.2)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    [node] = [n for n in ray.nodes() if n["NodeID"] == here]
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def _run_query(args) -> int:
    import requests

    from deploy.client import CharRNNClient, ServerError

    client = CharRNNClient(args.url, timeout=args.timeout, api_key=args.api_key)
    options = dict(max_chars=args.max_chars, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed, stop=args.stop)
    try:
        if args.stream:
            print(args.prime, end="", flush=True)
            for chunk in client.stream(args.prime, **options):
                print(chunk, end="", flush=True)
            print()
        else:
            print(args.prime + client.generate(args.prime, **options)["text"])
    except ServerError as err:
        raise CommandError(str(err))
    except requests.ConnectionError:
        raise CommandError(f"cannot connect to {args.url}: is `charrnn serve` running there?")
    except requests.RequestException as err:
        raise CommandError(f"{type(err).__name__}: {err}")
    return 0
