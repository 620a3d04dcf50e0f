"""The order in which each epoch walks the training runs, and each rank's share of them.

Shuffled (the default): each epoch reads the shards in a seeded permutation of the manifest's order,
and Ray Data's local shuffle buffer (`iter_batches(local_shuffle_buffer_size=...)`) then hands out
each run drawn uniformly from the `shuffle_buffer` runs read next. Both draws are seeded by (seed,
epoch): every epoch has its own order, the same seed gives the same one, and nothing holds more
than the buffer in memory. Corpus order (`--no-shuffle`): manifest order, the classic recipe's walk.

Every rank reads the same sequence and keeps the runs whose global number is its rank modulo the
number of ranks: the shares are disjoint and together they are the epoch. (Ray Data's
streaming_split would meet the ranks at a barrier at each epoch start; ranks whose shares differ in
length reach their epoch's end at different steps while DDP holds them in lockstep.)"""
from __future__ import annotations

from typing import Iterator

import numpy as np

READ_BATCH = 64  # runs per Arrow batch handed to the worker


def epoch_seed(seed: int, epoch: int, purpose: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, purpose]).generate_state(1)[0])


def shard_order(shards: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng(epoch_seed(seed, epoch, 0)).permutation(shards).tolist()


def quiet(ds):
    """Blocks in a stable order (a data position must mean the same runs on resume), and no
    execution banner from inside a worker, whose own progress line says more."""
    ds.context.execution_options.preserve_order = True
    ds.context.print_on_execution_start = False
    return ds


def epoch_runs(dataset, task, epoch: int, rank: int, world: int, seed: int,
               shuffle_buffer: int) -> Iterator[np.ndarray]:
    """This rank's training runs of `epoch`, as arrays (`task.runs`), in the epoch's order;
    `shuffle_buffer` 0 keeps corpus order."""
    shuffle = shuffle_buffer > 0
    order = shard_order(len(dataset.shard_paths("train")), seed, epoch) if shuffle else None
    batches = quiet(dataset.ray_dataset("train", order=order)).iter_batches(
        batch_size=READ_BATCH, batch_format="pyarrow", prefetch_batches=2,
        local_shuffle_buffer_size=shuffle_buffer if shuffle else None,
        local_shuffle_seed=epoch_seed(seed, epoch, 1) if shuffle else None)
    return share(batches, task, rank, world)


def validation_runs(dataset, task, rank: int, world: int, budget: int) -> list[np.ndarray]:
    """This rank's share of the validation runs in corpus order, at most `budget` / world points:
    read once and kept, since a bounded set is cheaper to hold than to stream at every evaluation."""
    budget, used, kept = budget // world, 0, []
    batches = quiet(dataset.ray_dataset("validation")).iter_batches(
        batch_size=READ_BATCH, batch_format="pyarrow", prefetch_batches=2)
    for run in share(batches, task, rank, world):
        if used >= budget:
            break
        kept.append(np.array(run[: budget - used + 1]))
        used += len(kept[-1]) - 1
    return kept


def share(batches, task, rank: int, world: int) -> Iterator[np.ndarray]:
    for table in batches:
        mine = np.asarray(table["run"]) % world == rank
        yield from task.runs(table.filter(mine))
