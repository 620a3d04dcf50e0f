"""charrnn train: data-parallel training on Ray Train."""
from __future__ import annotations

import argparse
import os

from charrnn.ray_session import add_address_option, connect, is_local


def add_commands(sub) -> None:
    from training.config import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train a character-level RNN with Ray Train (DDP over --workers)",
        description="Train on a prepared dataset (or on raw INPUTs, prepared into RUN_DIR/data first). Writes "
                    "RUN_DIR/model (the best model by validation loss), metrics.jsonl, loss.png and Ray Train "
                    "checkpoints. Defaults are the classic recipe (for --task series, the classic time-series "
                    "lesson's).",
    )
    opt = lambda *names, **kw: p.add_argument(*names, default=argparse.SUPPRESS, **kw)
    p.add_argument("--data", nargs="+", metavar="DIR_OR_INPUT",
                   help="a prepared dataset folder, or text files/folders/globs to prepare first "
                        "(not needed with --resume)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN_DIR from its latest checkpoint (optimizer, step, data position)")
    opt("--task", choices=["text", "series"],
        help="text (default): a dataset from charrnn prepare, models.CharRNN, cross-entropy; series: a dataset "
             "from charrnn prepare-series, models.SeriesRNN, squared error, and the lesson's defaults "
             "(--cell rnn --layers 1 --hidden 32 --dropout 0 --lr 0.01 --batch 16 --seq 20) for options not given")
    opt("--cell", choices=["lstm", "gru", "rnn"], help=f"recurrent cell (default {d.cell})")
    opt("--layers", type=int, help=f"stacked recurrent layers (default {d.layers})")
    opt("--hidden", type=int, help=f"units per layer (default {d.hidden})")
    opt("--dropout", type=float, help=f"dropout between layers and before the output (default {d.dropout})")
    opt("--embedding-dim", type=int, help="input embedding width (default: the vocabulary size, like one-hot)")
    opt("--batch", type=int, help=f"GLOBAL batch: text streams walked in parallel, split evenly over the workers "
                                  f"(default {d.batch})")
    opt("--seq", type=int, help=f"characters per window of truncated backpropagation (default {d.seq})")
    opt("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    opt("--lr-schedule", choices=["constant", "cosine"], help=f"learning-rate schedule (default {d.lr_schedule})")
    opt("--clip", type=float, help=f"gradient-norm clipping (default {d.clip})")
    opt("--epochs", type=float, help=f"passes over the training split (default {d.epochs:g})")
    opt("--max-steps", type=int, help="stop after this many steps (with --epochs: whichever comes first)")
    opt("--max-minutes", type=float, help="stop after this many minutes of training (checkpointed, evaluated), "
                                          "whatever --epochs and --max-steps say")
    opt("--val-every", type=int, help=f"evaluate every N steps, and at each epoch end (default {d.val_every})")
    opt("--val-max-tokens", type=int, help=f"validation tokens per evaluation, at most (default {d.val_max_tokens:,})")
    opt("--checkpoint-every", type=int, help=f"checkpoint every N steps, and at the end (default {d.checkpoint_every})")
    opt("--log-every", type=int, help=f"print progress every N steps (default {d.log_every})")
    opt("--tensorboard", metavar="DIR", type=_local_folder,
        help="also write TensorBoard event files (loss, validation loss, bits per char, chars/s, learning rate) "
             "into this local folder, on the node of worker 0 (`tensorboard --logdir DIR`)")
    opt("--seed", type=int, help=f"random seed: initial weights, dropout, data order (default {d.seed})")
    opt("--precision", choices=["auto", "fp32", "bf16"],
        help="bf16: autocast, with float32 weights and optimizer state; auto (default): bf16 where the GPU or CPU "
             "has it natively (AVX512-BF16, AMX) and a short probe at start-up measures it faster, float32 elsewhere")
    opt("--no-shuffle", dest="shuffle", action="store_false",
        help="walk the runs in corpus order every epoch (the classic recipe); default: each epoch in its own "
             "seeded order across all files and shards")
    opt("--shuffle-buffer", type=int, help=f"runs drawn from at random when shuffling (default {d.shuffle_buffer})")
    opt("--workers", type=int, help=f"data-parallel Ray Train workers (default {d.workers})")
    opt("--gpu", action="store_true", help="one GPU per worker and NCCL (default: CPU and gloo)")
    opt("--threads-per-worker", type=int, help="torch threads per worker (default: the node's CPUs / workers)")
    opt("--max-failures", type=int,
        help=f"restarts from the latest checkpoint after a worker dies (default {d.max_failures})")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray Train's and Ray Data's own log lines (default: progress, evaluations, "
                        "checkpoints and errors only)")
    add_address_option(p)
    p.set_defaults(handler=_run_train)


def _local_folder(value: str) -> str:
    """--tensorboard's folder, made absolute (Ray's workers run elsewhere); a URI is refused here,
    before abspath would turn it into a local folder named after it."""
    if "://" in value:
        raise argparse.ArgumentTypeError(f"takes a local folder, got {value!r}")
    return os.path.abspath(value)


def _run_train(args) -> int:
    from storage import public_location
    from training.config import TrainConfig
    from training.driver import train

    asked = vars(args)  # options not given are absent: a resumed run keeps its own
    if asked.get("precision") == "bf16" and not asked.get("gpu") and is_local(args.address):  # workers: this CPU
        from models import require_precision

        require_precision("bf16", "cpu")
    fields = TrainConfig.__dataclass_fields__
    options = {k: v for k, v in vars(args).items() if k in fields}
    summary = train(args.data or [], args.out, options, resume=args.resume,
                    before_ray=lambda: connect(args.address, args.num_cpus), verbose=args.verbose)
    print(f"trained {summary['steps']} steps; best validation loss {summary['best_val_loss']}; "
          f"model in {public_location(summary['model'])}")
    return 0
