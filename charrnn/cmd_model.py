"""charrnn sample / eval: use a trained model on this machine, no Ray needed."""
from __future__ import annotations

import sys

from charrnn.errors import CommandError


def add_commands(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained model",
                       description="Prime the model's state with --prime in one forward pass, then sample "
                                   "--length characters one at a time.")
    p.add_argument("--model", required=True, metavar="RUN_DIR",
                   help="a run folder (uses RUN_DIR/model) or a model folder; a local path or a pyarrow.fs URI")
    p.add_argument("--prime", default="The", help="text to start from (default 'The')")
    p.add_argument("--length", type=int, default=500, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; lower is more conservative (default 1.0)")
    p.add_argument("--top-k", type=int, default=None,
                   help=">= 1: sample among the k likeliest characters (default: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]: nucleus sampling (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text (default: random)")
    p.set_defaults(handler=_run_sample)

    p = sub.add_parser("eval", help="loss and bits per character of text files under a model",
                       description="Score each FILE (UTF-8, CRLF read as newline) under the model: loss in nats "
                                   "per character and bits per character. A long file is scored in parallel lanes: "
                                   "contiguous pieces side by side in one batch, each read from --burn-in characters "
                                   "before its own, so the figure stays that of one stream.")
    p.add_argument("--model", required=True, metavar="RUN_DIR",
                   help="a run folder or a model folder; a local path or a pyarrow.fs URI")
    p.add_argument("--lanes", type=int, default=None,
                   help="pieces scored side by side (default: one per 16,384 characters, at most 64; 1: one stream)")
    p.add_argument("--burn-in", type=int, default=1024,
                   help="characters each piece reads, unscored, before its own (default 1024)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: the network under bf16 autocast, faster on hardware with native bf16, the "
                        "loss not exactly float32's (default fp32)")
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files: local paths or pyarrow.fs URIs")
    p.set_defaults(handler=_run_eval)




def _check_sampling(args) -> str | None:
    if not args.temperature > 0:
        return f"--temperature must be > 0, got {args.temperature}"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    if not 0 < args.top_p <= 1:
        return f"--top-p must be in (0, 1], got {args.top_p}"
    if args.length < 0:
        return f"--length must be >= 0, got {args.length}"
    if not args.prime:
        return "--prime must not be empty"
    return None


def _run_sample(args) -> int:
    problem = _check_sampling(args)
    if problem:
        raise CommandError(problem)
    from deploy import source
    from models import generate

    model, vocab, _ = source.load(source.resolve(args.model))
    unknown = vocab.unknown_chars(args.prime)
    if unknown:
        print(f"charrnn sample: note: {len(unknown)} character(s) of the prime are not in the vocabulary "
              f"({''.join(unknown)!r}); they read as the unknown id", file=sys.stderr)
    ids = generate(model, vocab.encode(args.prime).tolist(), args.length, args.temperature, args.top_k,
                   args.top_p, args.seed)
    print(args.prime + vocab.decode(ids))
    return 0


def _run_eval(args) -> int:
    if args.lanes is not None and args.lanes < 1 or args.burn_in < 0:
        raise CommandError("--lanes must be >= 1 and --burn-in >= 0")
    from deploy import source
    from models import score
    from models.generate import bits_per_char
    from pipeline.text.vocab import normalize_newlines
    from storage import read_file

    model, vocab, _ = source.load(source.resolve(args.model))
    for name in args.files:
        try:
            text = normalize_newlines(read_file(name).decode("utf-8"))
        except UnicodeDecodeError as err:
            raise CommandError(f"invalid UTF-8 in {name} at byte {err.start}") from None
        lanes = args.lanes or min(64, max(1, len(text) // 16384))
        total, count = score(model, vocab.encode(text).tolist(), lanes=lanes, burn_in=args.burn_in,
                             precision=args.precision)
        if count == 0:
            raise CommandError(f"{name} has fewer than two characters: nothing to score")
        used = min(lanes, count)
        how = "one stream" if used == 1 else f"{used} lanes, {args.burn_in:,} characters of burn-in each"
        how += ", bf16" if args.precision == "bf16" else ""
        print(f"{name}: loss {total / count:.4f} nats/char, {bits_per_char(total / count):.4f} bits/char, "
              f"{count:,} characters ({how})")
    return 0
