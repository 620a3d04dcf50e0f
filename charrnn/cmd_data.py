"""charrnn prepare / prepare-series / verify: corpus or time series -> prepared dataset, and its checksum check."""
from __future__ import annotations

import sys

from charrnn.ray_session import add_address_option, connect


def add_commands(sub) -> None:
    _add_prepare(sub)
    _add_prepare_series(sub)
    _add_verify(sub)


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="turn text files into a prepared dataset (vocabulary + Parquet shards + manifest)",
        description="Read text with Ray Data in byte ranges (never a whole file in one task), count characters, "
                    "encode them into token runs and write Parquet shards and DIR/manifest.json. With no INPUT, "
                    "the .py files of this Python's standard library (read with --errors replace, since a few of "
                    "its test files are deliberately not UTF-8).",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files, folders (recursive, hidden entries skipped) or globs (* ? [..] and **); local paths "
                        "or pyarrow.fs URIs (s3://, gs://, file://)")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder to write (local path or URI)")
    p.add_argument("--min-count", type=int, default=1, help="keep characters seen at least this often (default 1)")
    p.add_argument("--max-vocab", type=int, default=None, help="keep at most this many characters, most frequent first")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of runs held out for validation (default 0.1)")
    p.add_argument("--run-length", type=int, default=16384,
                   help="tokens per run, the stretch of text a trainer walks with carried state (default 16384)")
    p.add_argument("--range-mb", type=float, default=32.0, help="MiB of a file one read task holds (default 32)")
    p.add_argument("--errors", choices=["strict", "replace"], default=None,
                   help="invalid UTF-8: fail naming file and byte (strict, the default for INPUTs) or substitute "
                        "U+FFFD and count them (replace, the default for the built-in corpus)")
    add_address_option(p)
    p.set_defaults(handler=_run_prepare)


def _run_prepare(args) -> int:
    from pipeline.text.prepare import PrepareOptions, prepare
    from storage import public_location

    errors = args.errors or ("strict" if args.inputs else "replace")
    options = PrepareOptions(min_count=args.min_count, max_vocab=args.max_vocab, val_fraction=args.val_fraction,
                             run_length=args.run_length, range_mb=args.range_mb, errors=errors)
    manifest = prepare(args.inputs, args.out, options,
                       before_ray=lambda: connect(args.address, args.num_cpus, dashboard=False))
    print(_summary(manifest, public_location(args.out)))
    return 0


def _summary(manifest: dict, out: str) -> str:
    totals, splits = manifest["totals"], manifest["splits"]
    mb = totals["bytes"] / 1e6
    seconds = manifest["elapsed_s"]
    shards = sum(len(s["shards"]) for s in splits.values())
    lines = [
        f"prepared {out}",
        f"  files       {totals['files']:,} ({len(manifest['skipped'])} binary skipped)",
        f"  size        {mb:,.1f} MB in {seconds:.1f} s ({mb / seconds:,.1f} MB/s)",
        f"  characters  {totals['chars']:,} ({totals['replaced_chars']:,} invalid bytes replaced)",
        f"  vocabulary  {manifest['vocab']['size']} ids ({manifest['vocab']['dtype']}, unknown id "
        f"{manifest['vocab']['unknown_id']})",
        f"  train       {splits['train']['tokens']:,} tokens in {splits['train']['runs']:,} runs",
        f"  validation  {splits['validation']['tokens']:,} tokens in {splits['validation']['runs']:,} runs",
        f"  shards      {shards}, manifest {out.rstrip('/')}/manifest.json",
    ]
    return "\n".join(lines)


def _add_prepare_series(sub) -> None:
    p = sub.add_parser(
        "prepare-series", help="turn numeric columns of CSV/Parquet files into a prepared series dataset",
        description="Read numeric columns of CSV or Parquet files with Ray Data (files in INPUT order, rows in file "
                    "order), check every value, split each series by time (its last --val-fraction is validation), "
                    "cut it into runs and write Parquet shards and DIR/manifest.json with the training split's "
                    "normalization. --synthetic sine generates the classic lesson's data instead.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="CSV or Parquet files, folders (their .csv and .parquet files) or globs; local paths or "
                        "pyarrow.fs URIs")
    p.add_argument("--column", metavar="A[,B...]",
                   help="the numeric column(s) to read, in this order: the features")
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder to write (local path or URI)")
    p.add_argument("--series-id", metavar="COL",
                   help="rows with the same value of COL (in any file) form one series; default: one series per file")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="the last share of each series' points held out for validation (default 0.1)")
    p.add_argument("--run-length", type=int, default=1000,
                   help="points per run, the stretch a trainer walks with carried state (default 1000)")
    p.add_argument("--shard-points", type=int, default=1_000_000, help="points per shard at most (default 1000000)")
    p.add_argument("--synthetic", choices=["sine"], default=None,
                   help="generate --series series of --points values sin(0.1 t + phase), column value, instead of "
                        "reading INPUTs")
    p.add_argument("--series", type=int, default=4, help="--synthetic: number of series (default 4)")
    p.add_argument("--points", type=int, default=10000, help="--synthetic: points per series (default 10000)")
    add_address_option(p)
    p.set_defaults(handler=_run_prepare_series)


def _run_prepare_series(args) -> int:
    from pipeline.series.prepare import SeriesOptions, prepare_series
    from storage import public_location

    columns = tuple(c.strip() for c in args.column.split(",")) if args.column else ()
    options = SeriesOptions(columns=columns, series_id=args.series_id, val_fraction=args.val_fraction,
                            run_length=args.run_length, shard_points=args.shard_points, synthetic=args.synthetic,
                            series=args.series, points=args.points)
    manifest = prepare_series(args.inputs, args.out, options,
                              before_ray=lambda: connect(args.address, args.num_cpus, dashboard=False))
    print(_series_summary(manifest, public_location(args.out)))
    return 0


def _series_summary(manifest: dict, out: str) -> str:
    totals, splits, norm = manifest["totals"], manifest["splits"], manifest["normalization"]
    made = manifest["synthetic"]
    source = (f"generated: {made['series']} x {made['points']:,} points of {made['formula']}" if made
              else f"{totals['files']:,} ({totals['rows']:,} rows)")
    shards = sum(len(s["shards"]) for s in splits.values())
    lines = [
        f"prepared {out} in {manifest['elapsed_s']:.1f} s",
        f"  files       {source}",
        f"  series      {totals['series']:,}, features {', '.join(manifest['columns'])}",
        f"  train       {splits['train']['points']:,} points in {splits['train']['runs']:,} runs",
        f"  validation  {splits['validation']['points']:,} points in {splits['validation']['runs']:,} runs",
        f"  mean / std  {', '.join(f'{m:.4g} / {s:.4g}' for m, s in zip(norm['mean'], norm['std']))} (train)",
        f"  shards      {shards}, manifest {out.rstrip('/')}/manifest.json",
    ]
    return "\n".join(lines)


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="re-check every shard of a prepared dataset against its manifest",
                       description="Re-read every shard of DIR (a text or a series dataset) and compare size, "
                                   "sha256, rows and tokens or points with DIR/manifest.json. Exit 0 when all match, "
                                   "1 otherwise.")
    p.add_argument("dataset", metavar="DIR")
    p.set_defaults(handler=_run_verify)


def _run_verify(args) -> int:
    from pipeline.shards import open_prepared

    dataset = open_prepared(args.dataset)
    problems = dataset.verify()
    shards = sum(len(s["shards"]) for s in dataset.manifest["splits"].values())
    for problem in problems:
        print(f"charrnn verify: {args.dataset}/{problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.dataset}: {shards} shards ok")
    return 0
