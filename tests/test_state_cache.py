"""Contexts without Ray: the prefix-state cache, forks, continuing from a saved context, and
log-probabilities, on the decoder alone with a small random network (bit-exactness needs no training)."""
import asyncio
import random

import pytest
import torch

from deploy.decoder import Decoder
from deploy.sampling import Sampling
from deploy.state_cache import Context, PrefixCache
from models import CharRNN, ModelConfig

VOCAB = 40


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=VOCAB, hidden=64, layers=2)).eval()


def decoder_for(model, **kw) -> Decoder:
    return Decoder(model, [chr(48 + i) for i in range(VOCAB)], max_batch=16, **kw)


def run(decoder: Decoder, coroutine):
    try:
        return asyncio.run(coroutine)
    finally:
        decoder.close()


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def tiny_context(tag: float) -> Context:
    return Context(torch.full((1, 1, 4), tag), torch.zeros(1, 8))


def test_the_longest_cached_prefix_is_found_at_any_character():
    cache = PrefixCache(1 << 20)
    for key in ("abc", "abcdef", "abx", "b", "abcdezz"):
        cache.insert(key, tiny_context(len(key)))
    assert cache.lookup("abcdeq")[:1] == (3,)  # "abc"; "abcdef" and "abcdezz" share 5 but are no prefix
    assert cache.lookup("abcdeq")[2] == 5
    assert cache.lookup("abcdefgh")[:1] == (6,)
    assert cache.lookup("abxyz")[:1] == (3,) and cache.lookup("ab")[:2] == (0, None)
    assert cache.lookup("zzz")[:2] == (0, None) and cache.lookup("b")[0] == 1
    # where a prime running from 3 should leave contexts: every 256 characters, where it leaves the
    # longest shared prefix (so the next prime sharing it starts there), and at its end
    assert cache.snapshot_points(600, 3, 5) == [5, 256, 512, 600]


def test_the_cache_is_bounded_in_bytes_least_recently_used_out_first():
    one = len("k00") + tiny_context(0).nbytes
    cache = PrefixCache(3 * one)
    for i in range(3):
        cache.insert(f"k{i:02d}", tiny_context(i))
    assert cache.lookup("k00x")[0] == 3  # k00 is now the most recently used
    cache.insert("k03", tiny_context(3))
    assert len(cache) == 3 and cache.bytes <= 3 * one
    assert cache.lookup("k01")[0] == 0 and cache.lookup("k00")[0] == 3  # k01 was the oldest
    assert PrefixCache(0).lookup("k00") == (0, None, 0)


def test_same_seed_same_text_with_the_cache_on_or_off_and_the_shared_preamble_runs_once(model):
    """Primes sharing a 1,000-character preamble, differing after it, asked one after another (and a
    few again): with the cache each runs only what is new, and every text is what it is without."""
    rng = random.Random(0)
    preamble = ids(rng, 1000)
    primes = [preamble + ids(rng, rng.randrange(1, 300)) for _ in range(8)]
    asks = [(p, Sampling(max_chars=60, temperature=1.2, seed=i % 8))
            for i, p in enumerate(primes + primes[:3])]

    async def texts(decoder):
        out = []
        for prime, sampling in asks:
            out.append(decoder.submit(prime, sampling))
            await out[-1].done
        return [s.text for s in out], decoder.stats()

    cold = decoder_for(model, state_cache_bytes=0)
    plain, plain_stats = run(cold, texts(cold))
    warm = decoder_for(model)
    cached, stats = run(warm, texts(warm))
    assert cached == plain and len(set(plain)) == 8
    new_chars = sum(len(p) for p in primes) - 7 * len(preamble)
    assert plain_stats["prime_chars"] == sum(len(p) for p, _ in asks)
    # the second prime still runs from the last 256-boundary before the preamble's end
    assert stats["prime_chars"] <= new_chars + 1000 % 256 + 255
    assert stats["state_cache"]["hits"] >= 10 and stats["state_cache"]["entries"] > 8


def test_a_context_continued_gives_what_the_whole_prime_gives(model):
    """What a session does: the context after A, then B read from it and text sampled, equals one
    request with the prime A + B and the same seed; and so does reading the text back into it."""
    rng = random.Random(1)
    a, b = ids(rng, 300), ids(rng, 50)

    async def go(decoder):
        after_a = await decoder.context(a)
        [continued] = decoder.submit_group(b, [Sampling(max_chars=80, seed=7)], start=after_a)
        [whole] = decoder.submit_group(a + b, [Sampling(max_chars=80, seed=7)])
        [nothing_new] = decoder.submit_group([], [Sampling(max_chars=30, seed=3)], start=after_a)
        [a_alone] = decoder.submit_group(a, [Sampling(max_chars=30, seed=3)])
        await asyncio.gather(*(s.done for s in (continued, whole, nothing_new, a_alone)))
        text_ids = [ord(c) - 48 for c in continued.text]
        after_text = await decoder.context(text_ids, start=continued.context)
        direct = await decoder.context(a + b + text_ids)
        return continued, whole, nothing_new, a_alone, after_text, direct

    continued, whole, nothing_new, a_alone, after_text, direct = run(
        decoder := decoder_for(model, state_cache_bytes=0), go(decoder))
    assert continued.text == whole.text and len(whole.text) == 80
    assert nothing_new.text == a_alone.text
    # Prefill's slices follow the last decode step's time, and an LSTM over another slice length may
    # round differently in the last bit: the states agree to float32 rounding, the texts exactly.
    assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(after_text.tensors, direct.tensors))


def test_log_probabilities_are_the_models_own(model):
    """Each sampled character's log-probability and the top alternatives are those of the network
    run over the prime and the text (temperature 1, nothing cut), whatever the sampling settings."""
    rng = random.Random(2)
    prime = ids(rng, 40)

    async def go(decoder):
        seq = decoder.submit(prime, Sampling(max_chars=50, temperature=0.7, top_k=5, seed=1, logprobs=3))
        plain = decoder.submit(prime, Sampling(max_chars=50, temperature=0.7, top_k=5, seed=1))
        await asyncio.gather(seq.done, plain.done)
        scored = await decoder.score(prime + [ord(c) - 48 for c in seq.text], top=3)
        return seq, plain, scored

    seq, plain, scored = run(decoder := decoder_for(model), go(decoder))
    assert seq.text == plain.text and len(seq.logprobs) == 50 and plain.logprobs == []
    tail = slice(len(prime) - 1, None)  # the score's predictions of the sampled characters
    assert [lp for lp, _ in seq.logprobs] == pytest.approx(scored.logprobs[tail], abs=1e-4)
    for (lp, top), alternatives in zip(seq.logprobs, scored.alternatives[tail]):
        assert [c for c, _ in top] == [chr(48 + i) for i, _ in alternatives]
        assert top[0][1] >= lp and len(top) == 3
    assert scored.total == pytest.approx(-sum(scored.logprobs), rel=1e-6)


def test_a_stop_string_takes_its_log_probabilities_with_it(model):
    async def go(decoder):
        first = decoder.submit([1, 2, 3], Sampling(max_chars=200, seed=5, logprobs=0))
        await first.done
        stop = first.text[20:22]
        stopped = decoder.submit([1, 2, 3], Sampling(max_chars=200, seed=5, logprobs=0, stop=(stop,)))
        await stopped.done
        return first, stopped

    first, stopped = run(decoder := decoder_for(model), go(decoder))
    assert stopped.finish_reason == "stop" and len(stopped.logprobs) == len(stopped.chars) <= 20
    assert stopped.logprobs == first.logprobs[:len(stopped.chars)]
    assert all(top == [] for _, top in stopped.logprobs)


def test_primes_arriving_together_read_their_shared_preamble_once(model):
    """Eight primes sharing a 1,000-character preamble, submitted at once, before anything is
    cached: the first runs whole, the preamble runs once more as a job the other seven wait for, and
    each then runs only its own tail. Every text is what it is with no cache at all."""
    rng = random.Random(3)
    preamble = ids(rng, 1000)
    primes = [preamble + ids(rng, 30 + i) for i in range(8)]

    async def together(decoder):
        seqs = [decoder.submit(p, Sampling(max_chars=40, seed=i)) for i, p in enumerate(primes)]
        await asyncio.gather(*(s.done for s in seqs))
        return [s.text for s in seqs], decoder.stats()["prime_chars"]

    cached, primed = run(warm := decoder_for(model), together(warm))
    plain, plain_primed = run(cold := decoder_for(model, state_cache_bytes=0), together(cold))
    assert cached == plain and len(set(plain)) == 8
    assert plain_primed == sum(map(len, primes))
    assert primed == len(primes[0]) + len(preamble) + sum(len(p) - len(preamble) for p in primes[1:])
