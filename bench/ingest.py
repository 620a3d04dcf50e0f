#!/usr/bin/env python3
"""Ingest benchmark: `charrnn prepare` throughput and peak memory on generated ASCII corpora.

Prints one JSON object. In one run it:
  1. generates a throughput corpus (--throughput-mb) and times the classic recipe's encode on it
     (/work/shared/baselines/notebook_charrnn.py: read, sorted(set(text)), a dict lookup per
     character) in a subprocess, optionally on a prefix (--classic-mb);
  2. times `pipeline.prepare` on it in this process with Ray already started and warmed up, then the
     whole `charrnn prepare` command line (Ray start-up included);
  3. runs `charrnn prepare` on corpora of --sizes-mb (default 250 and 2000 MB, 8x apart) and samples
     the summed RSS and PSS of the command and all its Ray processes every --sample-s from /proc.

Corpora are written to a temporary folder (--tmp) in chunks and deleted afterwards: words drawn
from a fixed vocabulary with a seeded RNG, lines ending in LF or (1 in 20) CRLF, one big file
(half the corpus, so ranges split it) and several medium and small files (small ones get packed).

  python bench/ingest.py                 # the full run (about 10 minutes on 2 cores)
  python bench/ingest.py --quick         # a smoke run on small corpora
  python bench/ingest.py --range-sweep 4,8,32   # also time the in-process prepare at these --range-mb
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MB = 10**6

# The classic recipe's encode, step for step as in notebook_charrnn.py, over the corpus files in order.
CLASSIC = r"""
import json, sys, time
import numpy as np
files, limit = sys.argv[2:], int(sys.argv[1])
t0 = time.perf_counter()
parts, left = [], limit
for name in files:
    if left <= 0:
        break
    with open(name, "r") as f:
        parts.append(f.read(left))
    left -= len(parts[-1])
text = "".join(parts)
chars = tuple(sorted(set(text)))
char2int = {ch: i for i, ch in enumerate(chars)}
encoded = np.array([char2int[ch] for ch in text])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "mb": len(text.encode()) / 1e6, "chars": "".join(chars)}))
"""


# ---------------------------------------------------------------------------------------- corpus

class TextGenerator:
    """Deterministic English-looking ASCII: Zipf-distributed words, punctuation, LF and CRLF lines."""

    def __init__(self, seed: int = 0, pool_mb: int = 32):
        rng = np.random.default_rng(seed)
        letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
        letter_p = 1 / np.arange(1, 27)
        words = []
        for _ in range(8000):
            word = bytes(rng.choice(letters, int(rng.integers(1, 13)), p=letter_p / letter_p.sum()))
            roll = rng.random()
            words.append(str(rng.integers(0, 10000)).encode() if roll < 0.02 else
                         word.capitalize() if roll < 0.12 else word)
        seps = [b" ", b", ", b". ", b"; ", b"\n", b"\r\n", b' "', b'" ', b"? ", b"!\n"]
        sep_p = np.array([820, 60, 35, 5, 57, 3, 5, 5, 5, 5], float)
        pieces = words + seps
        table = np.frombuffer(b"".join(pieces), np.uint8)
        lengths = np.array([len(p) for p in pieces])
        offsets = np.cumsum(lengths) - lengths
        # Sampling tables: drawing from them with uniform integers is much faster than rng.choice(p=...).
        word_table = np.repeat(np.arange(len(words)), np.maximum(1, (2**17 / (np.arange(len(words)) + 8)).astype(int)))
        sep_table = np.repeat(np.arange(len(seps)) + len(words), sep_p.astype(int))
        n = pool_mb * MB // 7
        ids = np.empty(2 * n, np.int64)
        ids[0::2] = word_table[rng.integers(0, word_table.size, n)]
        ids[1::2] = sep_table[rng.integers(0, sep_table.size, n)]
        piece_lengths = lengths[ids]
        starts = np.cumsum(piece_lengths) - piece_lengths
        gather = np.arange(int(piece_lengths.sum())) + np.repeat(offsets[ids] - starts, piece_lengths)
        # A pool of text; files are stitched from line-aligned slices of it taken at random places.
        self.pool = table[gather].tobytes()
        self.line_starts = np.flatnonzero(np.frombuffer(self.pool, np.uint8) == 10) + 1
        self.line_starts = self.line_starts[self.line_starts < len(self.pool) - 2**17]
        self.rng = rng

    def chunk(self, size: int) -> bytes:
        """`size` bytes (at least 1): lines, the last one maybe cut short."""
        parts, total = [], 0
        while total < size:
            start = int(self.line_starts[self.rng.integers(0, self.line_starts.size)])
            end = self.pool.rfind(b"\n", start, start + int(self.rng.integers(2**12, 2**17))) + 1
            end = min(max(end, start + 1), start + size - total)
            parts.append(self.pool[start:end])
            total += end - start
        return b"".join(parts)

    def write_file(self, path: Path, size: int, chunk: int = 8 * MB) -> int:
        written = 0
        with open(path, "wb") as f:
            while written < size:
                data = self.chunk(min(chunk, size - written))
                f.write(data)
                written += len(data)
        return written


def write_corpus(folder: Path, size_mb: float, seed: int) -> dict:
    """One big file (1/2), three medium ones (1/8 each) and 16 small ones (1/128 each)."""
    folder.mkdir(parents=True)
    gen = TextGenerator(seed)
    total = int(size_mb * MB)
    shares = [("big.txt", 1 / 2)] + [(f"medium-{i}.txt", 1 / 8) for i in range(3)] + \
             [(f"small/s-{i:02d}.txt", 1 / 128) for i in range(16)]
    (folder / "small").mkdir()
    t0 = time.perf_counter()
    sizes = {name: gen.write_file(folder / name, max(1, int(total * share))) for name, share in shares}
    files = sorted(str(folder / name) for name in sizes)
    return {"path": str(folder), "files": files, "n_files": len(files), "bytes": sum(sizes.values()),
            "biggest_file_bytes": max(sizes.values()), "generate_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------- /proc sampling

def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, session id, cpu ticks used) for every process now alive."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(name)] = (int(fields[1]), int(fields[3]), int(fields[11]) + int(fields[12]))
    return table


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Peak summed RSS and PSS of `root` and its descendants (and its session, if it leads one), the
    CPU time they used, and the CPU time that processes outside this benchmark used meanwhile (noise)."""

    def __init__(self, root: int, interval: float = 0.2, bench_pid: int = os.getpid()):
        super().__init__(daemon=True)
        self.root, self.interval, self.bench_pid = root, interval, bench_pid
        self.peak_rss = self.peak_pss = self.max_procs = self.samples = 0
        self.foreign_ticks = 0
        self._last_cpu: dict[int, int] = {}
        self._first_ticks: dict[int, int] = {}  # CPU ticks of our processes when first seen (0 if born later)
        self._last_ticks: dict[int, int] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.sample()
            if self._done.wait(self.interval):
                return

    def stop(self) -> "TreeSampler":
        self._done.set()
        self.join()
        self.sample()
        return self

    def sample(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        mine = _descendants(children, self.root)
        if self.root in table and table[self.root][1] == self.root:  # a session leader: its session too
            mine |= {pid for pid, (_, sid, _) in table.items() if sid == self.root}
        for pid in mine & table.keys():
            self._first_ticks.setdefault(pid, table[pid][2] if not self.samples else 0)
            self._last_ticks[pid] = table[pid][2]
        ours = _descendants(children, self.bench_pid)
        rss = sum(_kib(f"/proc/{pid}/status", "VmRSS:") for pid in mine)
        pss = sum(_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in mine)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.max_procs, self.samples = max(self.max_procs, len(mine)), self.samples + 1
        cpu = {pid: ticks for pid, (_, _, ticks) in table.items() if pid not in ours}
        if self._last_cpu:
            self.foreign_ticks += sum(t - self._last_cpu.get(pid, t) for pid, t in cpu.items())
        self._last_cpu = cpu

    def report(self) -> dict:
        return {"peak_rss_mb": round(self.peak_rss * 1024 / MB, 1), "peak_pss_mb": round(self.peak_pss * 1024 / MB, 1),
                "max_processes": self.max_procs, "samples": self.samples,
                "cpu_s": round(sum(self._last_ticks[p] - self._first_ticks[p] for p in self._last_ticks)
                               / os.sysconf("SC_CLK_TCK"), 1),
                "other_processes_cpu_s": round(self.foreign_ticks / os.sysconf("SC_CLK_TCK"), 1)}


def _descendants(children: dict[int, list[int]], root: int) -> set[int]:
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def wait_quiet(limit_s: float) -> bool:
    """Wait up to `limit_s` for other processes to go quiet (under 0.15 cores busy over 3 s); while
    this benchmark waits it is idle itself, so the machine's busy time is theirs."""
    deadline = time.perf_counter() + limit_s
    while True:
        before = _busy_ticks()
        time.sleep(3)
        busy, total = (a - b for a, b in zip(_busy_ticks(), before))
        if busy / total * os.cpu_count() < 0.15:
            return True
        if time.perf_counter() > deadline:
            return False


def _busy_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # all but idle and iowait, all


def run_sampled(cmd: list[str], interval: float, **kwargs) -> tuple[subprocess.CompletedProcess, float, dict]:
    """Run `cmd` in its own session; wall seconds and the memory peaks of it and its children."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    sampler = TreeSampler(proc.pid, interval)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return result, wall, sampler.report()


# ---------------------------------------------------------------------------------------- stages

def charrnn_cmd() -> list[str]:
    exe = shutil.which("charrnn")
    return [exe] if exe else [sys.executable, "-m", "charrnn"]


def cli_prepare(corpus: dict, out: Path, num_cpus: int, interval: float) -> dict:
    cmd = charrnn_cmd() + ["prepare", corpus["path"], "--out", str(out), "--num-cpus", str(num_cpus)]
    _, wall, memory = run_sampled(cmd, interval, cwd=REPO)
    manifest = json.loads((out / "manifest.json").read_text())
    check_manifest(manifest, corpus)
    shutil.rmtree(out)
    return {"wall_s": round(wall, 2), "mb_per_s": round(corpus["bytes"] / MB / wall, 1), **memory,
            "shard_sha256": shard_digests(manifest)}


def check_manifest(manifest: dict, corpus: dict) -> None:
    if manifest["totals"]["bytes"] != corpus["bytes"] or manifest["totals"]["files"] != corpus["n_files"]:
        sys.exit(f"prepare read {manifest['totals']} of a corpus of {corpus['bytes']} bytes "
                 f"in {corpus['n_files']} files")


def shard_digests(manifest: dict) -> list[str]:
    return [s["sha256"] for split in ("train", "validation") for s in manifest["splits"][split]["shards"]]


def classic_encode(corpus: dict, limit_mb: float, interval: float) -> dict:
    limit = int(limit_mb * MB) if limit_mb else corpus["bytes"]
    result, _, memory = run_sampled([sys.executable, "-c", CLASSIC, str(limit), *corpus["files"]], interval)
    figures = json.loads(result.stdout)
    return {"mb": round(figures["mb"], 1), "seconds": round(figures["seconds"], 2),
            "mb_per_s": round(figures["mb"] / figures["seconds"], 2), "prefix_only": limit < corpus["bytes"],
            "mb_per_cpu_s": round(figures["mb"] / max(memory["cpu_s"], 0.01), 2), "chars": figures["chars"], **memory}


def inprocess_prepare(corpus: dict, warmup: dict, out: Path, num_cpus: int, interval: float,
                      settle=lambda: None, range_sweep: tuple[float, ...] = ()) -> dict:
    """The timed, sampled prepare with default options; then, for each --range-mb in `range_sweep`,
    the same prepare again, timed by the clock alone."""
    import logging

    import ray

    from pipeline.text.prepare import PrepareOptions, prepare

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # progress lines on stderr

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        options = PrepareOptions(errors="strict")
        # Start the workers and import everything in them, with many small tasks so that each worker gets some.
        prepare([warmup["path"]], str(out), PrepareOptions(range_mb=0.05), log=lambda msg: None)
        shutil.rmtree(out)
        settle()
        sampler = TreeSampler(os.getpid(), interval)
        sampler.start()
        t0 = time.perf_counter()
        manifest = prepare([corpus["path"]], str(out), options, log=lambda msg: None)
        seconds = time.perf_counter() - t0
        sampler.stop()
        sweep = []
        for range_mb in range_sweep:
            shutil.rmtree(out)
            t0 = time.perf_counter()
            prepare([corpus["path"]], str(out), PrepareOptions(errors="strict", range_mb=range_mb),
                    log=lambda msg: None)
            took = time.perf_counter() - t0
            sweep.append({"range_mb": range_mb, "seconds": round(took, 2),
                          "mb_per_s": round(corpus["bytes"] / MB / took, 1)})
    finally:
        ray.shutdown()
    check_manifest(manifest, corpus)
    shutil.rmtree(out)
    report = sampler.report()
    return {"seconds": round(seconds, 2), "mb_per_s": round(corpus["bytes"] / MB / seconds, 1),
            "mb_per_cpu_s": round(corpus["bytes"] / MB / max(report["cpu_s"], 0.01), 2),
            "vocab_chars": manifest["vocab"]["chars"], "shards": len(shard_digests(manifest)),
            "shard_sha256": shard_digests(manifest), "range_sweep": sweep, **report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", default="250,2000", help="corpus sizes for the memory runs (default 250,2000)")
    ap.add_argument("--throughput-mb", type=float, default=500,
                    help="corpus size for the throughput runs (default 500)")
    ap.add_argument("--classic-mb", type=float, default=0,
                    help="time the classic encode on this prefix of the throughput corpus (default 0: all of it)")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs for Ray (default: all)")
    ap.add_argument("--sample-s", type=float, default=0.2, help="memory sampling interval (default 0.2 s)")
    ap.add_argument("--tmp", default=None, help="folder for the generated corpora and outputs (default: system temp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each timed step, wait up to S seconds for other processes to go idle (default 0)")
    ap.add_argument("--range-sweep", default="", metavar="MB,MB,...",
                    help="after the timed in-process prepare, time it once more at each of these --range-mb "
                         "(default: none)")
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 16,128 MB, throughput 32 MB")
    args = ap.parse_args()
    if args.quick:
        args.sizes_mb, args.throughput_mb = "16,128", 32
    sizes = [float(s) for s in args.sizes_mb.split(",")]

    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="charrnn-bench-ingest-", dir=args.tmp))
    log = lambda msg: print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)
    quiet = {}

    def settle(step: str) -> None:
        if args.wait_quiet:
            log(f"waiting up to {args.wait_quiet:g} s for other processes to go idle")
            quiet[step] = wait_quiet(args.wait_quiet)
        log(step)
    try:
        log(f"generating the {args.throughput_mb:g} MB throughput corpus in {tmp}")
        corpus = write_corpus(tmp / "throughput", args.throughput_mb, args.seed)
        warmup = write_corpus(tmp / "warmup", 2, args.seed + 1)
        settle("classic encode")
        classic = classic_encode(corpus, args.classic_mb, args.sample_s)
        inproc = inprocess_prepare(corpus, warmup, tmp / "out", args.num_cpus, args.sample_s,
                                   lambda: settle("pipeline.prepare in-process"),
                                   tuple(float(r) for r in args.range_sweep.split(",") if r))
        settle("charrnn prepare (CLI)")
        cli = cli_prepare(corpus, tmp / "out", args.num_cpus, args.sample_s)
        shutil.rmtree(corpus["path"])
        memory = {}
        for size in sizes:
            log(f"generating {size:g} MB")
            mem_corpus = write_corpus(tmp / f"mem-{size:g}", size, args.seed + 2)
            settle(f"charrnn prepare on {size:g} MB")
            run = cli_prepare(mem_corpus, tmp / "out", args.num_cpus, args.sample_s)
            run.pop("shard_sha256")
            memory[f"{size:g}"] = {"corpus_bytes": mem_corpus["bytes"], "files": mem_corpus["n_files"], **run}
            shutil.rmtree(mem_corpus["path"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = inproc["mb_per_s"] / classic["mb_per_s"]
    small, large = memory[f"{min(sizes):g}"], memory[f"{max(sizes):g}"]
    rss_ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    pss_ratio = large["peak_pss_mb"] / small["peak_pss_mb"]
    result = {
        "benchmark": "ingest",
        "machine": {"cpu_count": os.cpu_count(), "ray_num_cpus": args.num_cpus, "platform": platform.platform(),
                    "python": platform.python_version(), "cpu": _cpu_model(),
                    "mem_total_gb": round(_kib("/proc/meminfo", "MemTotal:") * 1024 / 1e9, 1),
                    "loadavg_at_start": load_at_start},
        "command": " ".join(["python", "bench/ingest.py", *sys.argv[1:]]),
        "throughput_corpus": {k: corpus[k] for k in ("bytes", "n_files", "biggest_file_bytes", "generate_s")},
        "classic_encode": {k: v for k, v in classic.items() if k != "chars"},
        "prepare_inprocess": {k: v for k, v in inproc.items() if k not in ("vocab_chars", "shard_sha256")},
        "prepare_cli": {k: v for k, v in cli.items() if k != "shard_sha256"},
        "speedup_vs_classic": round(ratio, 2),
        "speedup_cli_vs_classic": round(cli["mb_per_s"] / classic["mb_per_s"], 2),
        # MB per CPU-second (all processes): robust to other load on the machine, unlike MB/s.
        "cpu_efficiency_vs_classic": round(inproc["mb_per_cpu_s"] / classic["mb_per_cpu_s"], 2),
        "notes": ["prepare MB/s: corpus bytes on disk / seconds; classic MB/s: bytes of the text it read "
                  "(CRLF already read as LF), as notebook_charrnn.py computes it",
                  "in-process: Ray started and its workers warmed up beforehand; CLI: the whole command",
                  "peak RSS/PSS: summed over the command and all of its Ray processes, sampled from /proc",
                  "cpu_s: CPU time of the step's processes; other_processes_cpu_s: CPU time other processes "
                  "on the machine used meanwhile (noise: wall-clock figures are only clean when it is ~0)"],
        "cli_and_inprocess_shards_identical": cli["shard_sha256"] == inproc["shard_sha256"],
        "vocab_matches_classic": None if classic["prefix_only"] else classic["chars"] == inproc["vocab_chars"],
        "memory": memory,
        "memory_ratio_rss": round(rss_ratio, 3),
        "memory_ratio_pss": round(pss_ratio, 3),
        "size_ratio": round(large["corpus_bytes"] / small["corpus_bytes"], 2),
        "targets": {
            "speedup_min_5x": ratio >= 5,
            "speedup_aim_10x": ratio >= 10,
            "memory_ratio_rss_max_1.2": rss_ratio <= 1.2,
            "memory_ratio_pss_max_1.2": pss_ratio <= 1.2,
        },
        "quiet_before": quiet or None,
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=1))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    main()
