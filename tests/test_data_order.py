"""The training data order (training/order.py) on real Ray Data: shuffled across files and shards
from the first steps, its own order every epoch, the same for the same seed, disjoint rank shares
whose union is the epoch; and a lane walk that resumes exactly where it was saved."""
import numpy as np
import pytest

from pipeline.text.dataset import PreparedDataset
from pipeline.text.prepare import PrepareOptions, prepare
from training.order import epoch_runs
from training.tasks import TextTask
from training.windows import EpochStream, Lanes

pytestmark = pytest.mark.slow  # starts Ray Train, Serve or a cluster: not in the fast tier

RUN = 500


@pytest.fixture(scope="module")
def two_alphabets(ray_local, tmp_path_factory):
    """Two corpora with disjoint alphabets, each many runs in several shards: corpus order walks
    all of the first before any of the second."""
    root = tmp_path_factory.mktemp("alphabets")
    rng = np.random.default_rng(0)
    for name, letters in (("a.txt", "abcdefghijklm"), ("b.txt", "NOPQRSTUVWXYZ")):
        (root / name).write_text("".join(rng.choice(list(letters), size=60_000)))
    prepare([str(root / "a.txt"), str(root / "b.txt")], str(root / "ds"),
            PrepareOptions(run_length=RUN, val_fraction=0.05, range_mb=0.02), log=lambda m: None)
    dataset = PreparedDataset(str(root / "ds"))
    assert len(dataset.shard_paths("train")) >= 4
    return dataset


def runs(dataset, epoch=0, rank=0, world=1, seed=0, buffer=64):
    task = TextTask({"model": {"vocab_size": dataset.vocab.size}, "vocab": dataset.manifest["vocab"]})
    return [np.array(r) for r in epoch_runs(dataset, task, epoch, rank, world, seed, buffer)]


def corpus_of(dataset, run) -> str:
    text = dataset.decode(run)
    return "a" if text[0].islower() else "b"


def fingerprint(run_list) -> list[bytes]:
    return [r.tobytes() for r in run_list]


def test_the_first_steps_see_both_corpora_when_shuffled_and_not_in_corpus_order(two_alphabets):
    lanes, seq = 4, 50
    for buffer, expect_both in ((64, True), (0, False)):
        walk = Lanes(runs(two_alphabets, buffer=buffer), lanes, seq)
        windows = list(walk)
        early = windows[: max(1, len(windows) // 20)]  # the first 5% of the steps
        seen = {corpus_of(two_alphabets, w.inputs[lane]) for w in early for lane in range(lanes)}
        assert (seen == {"a", "b"}) == expect_both, (buffer, seen)


def test_each_epoch_has_its_own_order_and_the_same_seed_gives_the_same(two_alphabets):
    first, again = runs(two_alphabets, epoch=0), runs(two_alphabets, epoch=0)
    second, other_seed = runs(two_alphabets, epoch=1), runs(two_alphabets, epoch=0, seed=7)
    assert fingerprint(first) == fingerprint(again)
    assert fingerprint(first) != fingerprint(second)
    assert fingerprint(first) != fingerprint(other_seed)
    assert sorted(fingerprint(first)) == sorted(fingerprint(second))  # the same runs, each once
    corpus_order = runs(two_alphabets, buffer=0)
    assert fingerprint(corpus_order) == [r.tobytes() for r in map(np.array, two_alphabets.iter_runs("train"))]


def test_rank_shares_are_disjoint_and_make_up_the_epoch(two_alphabets):
    whole = fingerprint(runs(two_alphabets, epoch=3))
    shares = [fingerprint(runs(two_alphabets, epoch=3, rank=rank, world=3)) for rank in range(3)]
    assert sorted(whole) == sorted(sum(shares, []))
    assert all(shares)


def test_a_lane_walk_restored_from_its_remainders_goes_on_exactly(two_alphabets):
    make_stream = lambda epoch, taken: EpochStream(lambda e: runs(two_alphabets, epoch=e, buffer=32), epoch, taken)
    stream = make_stream(0, 0)
    whole = Lanes(stream, 3, 64)
    walk = iter(whole)
    for _ in range(700):  # an epoch is about 600 windows: into the second one
        next(walk)
    saved = (stream.epoch, stream.taken, whole.remainders())
    after = [next(walk) for _ in range(40)]
    assert saved[0] == 1 and any(w.reset.any() for w in after)

    restored = iter(Lanes(make_stream(saved[0], saved[1]), 3, 64, saved[2]))
    for expected in after:
        got = next(restored)
        np.testing.assert_array_equal(got.inputs, expected.inputs)
        np.testing.assert_array_equal(got.targets, expected.targets)
        np.testing.assert_array_equal(got.reset, expected.reset)


@pytest.mark.parametrize("points, state", [
    # uint16 token ids (a vocabulary over 256), an LSTM's (h, c)
    ([np.arange(300, 310, dtype=np.uint16), None, np.arange(5, dtype=np.uint16)], "lstm"),
    # float series values [points, features], a GRU's h
    ([np.ones((4, 3), np.float32), np.zeros((7, 3), np.float32), None], "gru"),
    # every lane about to take a new run
    ([None, None, None], "gru"),
])
def test_lanes_files_round_trip(tmp_path, points, state):
    import torch

    from training.checkpoint import load_lanes, save_lanes

    h = torch.randn(2, 3, 8)
    made = (h, torch.randn(2, 3, 8)) if state == "lstm" else h
    save_lanes(str(tmp_path), 1, 2, 4, 17, points, made)
    got = load_lanes(str(tmp_path), 1, 2, "cpu")
    assert (got["epoch"], got["taken"]) == (4, 17)
    for saved, loaded in zip(points, got["remainders"]):
        assert (len(loaded) == 0) if saved is None else (np.array_equal(saved, loaded) and saved.dtype == loaded.dtype)
    for a, b in zip(made if state == "lstm" else (made,), got["state"] if state == "lstm" else (got["state"],)):
        assert torch.equal(a, b)
    assert load_lanes(str(tmp_path), 1, 3, "cpu") is None  # written by another number of ranks
    walk = Lanes(iter([]), 3, 2, got["remainders"])  # empty remainders mean "take a new run"
    assert [run is None for run in walk.current] == [saved is None for saved in points]


def test_a_share_of_one_point_runs_ends_instead_of_reading_epochs_forever():
    stream = EpochStream(lambda epoch: [np.array([epoch], np.uint8)] * 3)
    assert list(Lanes(stream, 2, 8)) == [] and stream.epoch == 0
