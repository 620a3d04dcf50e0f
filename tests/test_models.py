"""models/: the network, the model folder and sampling. Tiny models on the CPU."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import needs_bf16

from models import (CharRNN, ModelConfig, ModelFolderError, detach_state, load_model,
                    reset_state_rows, sample_next, save_model)

REPO = Path(__file__).resolve().parents[1]
BASELINE = Path(__file__).resolve().parents[2] / "shared" / "baselines" / "notebook_charrnn.py"
CELLS = ["lstm", "gru", "rnn"]
VOCAB = {"chars": "\nabcdefg", "unknown_id": 8}  # ids 0..8, as a prepared dataset's vocab JSON


def tiny(cell="lstm", **kw) -> tuple[CharRNN, ModelConfig]:
    torch.manual_seed(0)
    config = ModelConfig(**{"vocab_size": 9, "cell": cell, "layers": 2, "hidden": 16, "dropout": 0.25, **kw})
    return CharRNN(config).eval(), config


def ids(batch=3, time=11, vocab=9, seed=1) -> torch.Tensor:
    return torch.randint(vocab, (batch, time), generator=torch.Generator().manual_seed(seed))


# -- the network -------------------------------------------------------------------------------

def test_identity_embedding_equals_the_classic_one_hot_lstm():
    if not BASELINE.is_file():
        pytest.skip(f"classic baseline not found at {BASELINE}")
    spec = importlib.util.spec_from_file_location("notebook_charrnn", BASELINE)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)

    ours, _ = tiny(embedding_dim=9)  # vocab 9, 2 layers of 16, like the classic net below
    with torch.no_grad():
        ours.embedding.weight.copy_(torch.eye(9))
    classic = baseline.CharRNN(9, 16, 2, 0.25).eval()
    classic.lstm.load_state_dict(ours.rnn.state_dict())
    classic.fc.load_state_dict(ours.head.state_dict())

    x = ids()
    h0 = (torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    one_hot = torch.from_numpy(baseline.one_hot_encode(x.numpy(), 9))
    with torch.no_grad():
        want, (want_h, want_c) = classic(one_hot, h0)
        got, (got_h, got_c) = ours(x, h0)
    torch.testing.assert_close(got.reshape(-1, 9), want)
    torch.testing.assert_close(got_h, want_h)
    torch.testing.assert_close(got_c, want_c)


@pytest.mark.parametrize("cell", CELLS)
def test_forward_shapes_and_carried_state(cell):
    model, _ = tiny(cell)
    x = ids(batch=3, time=12)
    with torch.no_grad():
        whole, state = model(x)
        first, carried = model(x[:, :5])
        second, state2 = model(x[:, 5:], carried)
        from_zeros, _ = model(x, model.init_state(3))
    assert whole.shape == (3, 12, 9)
    states = state if isinstance(state, tuple) else (state,)
    assert [s.shape for s in states] == [(2, 3, 16)] * (2 if cell == "lstm" else 1)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(state2, state)
    torch.testing.assert_close(from_zeros, whole)


@pytest.mark.parametrize("cell", CELLS)
def test_step_is_forward_on_one_time_step(cell):
    model, _ = tiny(cell, layers=3)
    x = ids(batch=4, time=6)
    with torch.no_grad():
        _, carried = model(x[:, :5])
        for state in (carried, None):
            want, want_state = model(x[:, 5:], state)
            got, got_state = model.step(x[:, 5], state)
            torch.testing.assert_close(got, want[:, 0])
            torch.testing.assert_close(got_state, want_state)
        # training: dropout between layers, as nn.LSTM applies it, so the first layer's state is
        # untouched and the layers above it are not
        _, eval_state = model.step(x[:, 5], carried)
        _, train_state = model.train().step(x[:, 5], carried)
    for ours, evaluated in zip(*[s if isinstance(s, tuple) else (s,) for s in (train_state, eval_state)]):
        torch.testing.assert_close(ours[0], evaluated[0])
        assert not torch.allclose(ours[1:], evaluated[1:])


@pytest.mark.parametrize("cell", CELLS)
def test_reset_state_rows_restarts_only_the_chosen_rows(cell):
    model, _ = tiny(cell)
    x = ids(batch=3, time=10)
    with torch.no_grad():
        _, carried = model(x[:, :4])
        whole, _ = model(x)
        reset = reset_state_rows(carried, torch.tensor([False, True, False]))
        out, _ = model(x[:, 4:], reset)
        fresh, _ = model(x[1:2, 4:])
    torch.testing.assert_close(out[1:2], fresh)
    torch.testing.assert_close(out[[0, 2]], whole[[0, 2], 4:])


def test_detach_state_cuts_the_graph():
    for cell in ("lstm", "gru"):
        model, _ = tiny(cell)
        _, state = model.train()(ids())
        detached = detach_state(state)
        for s in detached if isinstance(detached, tuple) else (detached,):
            assert s.grad_fn is None and not s.requires_grad


def test_config_json_round_trip_and_errors():
    config = ModelConfig(vocab_size=65, cell="gru", layers=3, hidden=64, dropout=0, embedding_dim=32)
    again = ModelConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config and isinstance(again.dropout, float)
    assert ModelConfig(vocab_size=65).input_dim == 65 and config.input_dim == 32
    bad = [({"vocab_size": 65, "cell": "transformer"}, "cell must be one of lstm, gru, rnn"),
           ({"vocab_size": 65, "heads": 4}, "unknown keys: heads"),
           ({"cell": "lstm"}, "lacks vocab_size"),
           ({"vocab_size": 0}, "vocab_size must be a positive integer"),
           ({"vocab_size": 65, "layers": 2.5}, "layers must be a positive integer"),
           ({"vocab_size": 65, "hidden": True}, "hidden must be a positive integer"),
           ({"vocab_size": 65, "dropout": 1.0}, "dropout must be a number in [0, 1)"),
           ({"vocab_size": 65, "embedding_dim": -1}, "embedding_dim must be a positive integer")]
    for obj, message in bad:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
            ModelConfig.from_json(obj)
    with pytest.raises(ValueError, match="must be a JSON object"):
        ModelConfig.from_json(["vocab_size", 65])


def test_models_imports_neither_ray_nor_the_rest_of_the_repo():
    code = ("import sys, models; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'ray', 'pipeline', 'storage', 'training', 'deploy', 'charrnn', 'bench'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the model folder --------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_save_load_round_trip(tmp_path, cell):
    model, config = tiny(cell, embedding_dim=5)
    save_model(model, config, VOCAB, tmp_path / "m", info={"step": 7, "val_loss": 1.5})
    loaded, config2, vocab, info = load_model(tmp_path / "m")
    assert (config2, vocab, info) == (config, VOCAB, {"step": 7, "val_loss": 1.5})
    assert not loaded.training
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (meta["format"], meta["format_version"], meta["model"]) == ("charrnn-model", 1, config.to_json())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left behind


def test_save_replaces_a_model_folder_but_nothing_else(tmp_path):
    model, config = tiny()
    save_model(model, config, VOCAB, tmp_path / "m", info={"step": 1})
    save_model(model, config, VOCAB, tmp_path / "m", info={"step": 2})
    assert load_model(tmp_path / "m")[3] == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    (tmp_path / "empty").mkdir()
    save_model(model, config, VOCAB, tmp_path / "empty")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ModelFolderError, match="notes exists and is not a charrnn-model folder"):
        save_model(model, config, VOCAB, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_save_checks_before_writing(tmp_path):
    model, config = tiny()
    with pytest.raises(ModelFolderError, match="weights do not match"):
        save_model(model, ModelConfig(vocab_size=9, hidden=32), VOCAB, tmp_path / "m")
    with pytest.raises(ModelFolderError, match="vocab has ids up to 9 but the model's vocab_size is 9"):
        save_model(model, config, {"chars": "abcdefghi", "unknown_id": 9}, tmp_path / "m")
    with pytest.raises(TypeError):
        save_model(model, config, VOCAB, tmp_path / "m", info={"loss": torch.tensor(1.0)})
    assert list(tmp_path.iterdir()) == []


def _edit_config(folder: Path, change) -> None:
    meta = json.loads((folder / "config.json").read_text())
    change(meta)
    (folder / "config.json").write_text(json.dumps(meta))


def _edit_weights(folder: Path, change) -> None:
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors")


FOLDER_ERRORS = {
    "no folder": (shutil.rmtree, "model folder .*/m does not exist"),
    "no config": (lambda f: (f / "config.json").unlink(), "not a model folder: config.json is missing"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "not a model folder: model.safetensors is missing"),
    "bad json": (lambda f: (f / "config.json").write_text("{\"format\": "), "config.json is not readable JSON"),
    "other format": (lambda f: _edit_config(f, lambda m: m.update(format="gpt2")),
                     "is not a charrnn-model config \\(format 'gpt2'\\)"),
    "newer version": (lambda f: _edit_config(f, lambda m: m.update(format_version=2)),
                      "was written by format version 2; this charrnn reads version 1"),
    "bad model config": (lambda f: _edit_config(f, lambda m: m["model"].update(cell="lstmm")),
                         "config.json: model cell must be one of lstm, gru, rnn, got 'lstmm'"),
    "no vocab": (lambda f: _edit_config(f, lambda m: m.pop("vocab")), "vocab must be a JSON object"),
    "corrupt weights": (lambda f: (f / "model.safetensors").write_bytes(b"not safetensors"),
                        "model.safetensors is not a readable safetensors file"),
    "missing key": (lambda f: _edit_weights(f, lambda s: s.pop("head.bias")),
                    "weights do not match .*missing head.bias"),
    "unexpected key": (lambda f: _edit_weights(f, lambda s: s.update({"extra.weight": torch.zeros(2)})),
                       "weights do not match .*unexpected extra.weight"),
    "wrong shape": (lambda f: _edit_weights(f, lambda s: s.update({"head.bias": torch.zeros(10)})),
                    r"weights do not match .*head.bias is \[10\], the config needs \[9\]"),
    "NaN weights": (lambda f: _edit_weights(f, lambda s: s["head.bias"].__setitem__(0, float("nan"))),
                    "head.bias hold NaN or infinite values"),
    "infinite weights": (lambda f: _edit_weights(f, lambda s: s["rnn.weight_hh_l0"].__setitem__((1, 1), float("inf"))),
                         "rnn.weight_hh_l0 hold NaN or infinite values"),
    "absurd size": (lambda f: _edit_config(f, lambda m: m["model"].update(hidden=10**12)),
                    "model hidden of 1,000,000,000,000 is beyond this charrnn's limit"),
}


@pytest.mark.parametrize("case", FOLDER_ERRORS)
def test_model_folder_errors(tmp_path, case):
    model, config = tiny()
    folder = tmp_path / "m"
    save_model(model, config, VOCAB, folder)
    damage, message = FOLDER_ERRORS[case]
    damage(folder)
    with pytest.raises(ModelFolderError, match=message) as err:
        load_model(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_a_vocabulary_that_disagrees_with_itself_is_one_line(tmp_path):
    from deploy import source

    model, config = tiny()
    save_model(model, config, {**VOCAB, "counts": [1, 2]}, tmp_path / "m")
    with pytest.raises(ModelFolderError, match="counts must be a list of one integer per character") as err:
        source.load(source.resolve(str(tmp_path / "m")))
    assert "\n" not in str(err.value)


# -- sampling ----------------------------------------------------------------------------------

def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_sample_next_is_deterministic_and_rows_are_independent():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    temperature = torch.tensor([1.0, 0.7, 1.5, 1.0])
    top_k, top_p = torch.tensor([0, 5, 0, 12]), torch.tensor([1.0, 1.0, 0.9, 0.8])
    runs = [[sample_next(logits, temperature, top_k, top_p, g).tolist() for _ in range(20)]
            for g in (gens(1, 2, 3, 4), gens(1, 2, 3, 4))]
    assert runs[0] == runs[1]
    assert len({tuple(step) for step in runs[0]}) > 1  # the generators do advance

    # Row 2 alone, or among other rows with other seeds and parameters, draws the same ids.
    g = gens(3)
    alone = [sample_next(logits[2:3], 1.5, None, 0.9, g).item() for _ in range(20)]
    g = gens(9, 3, 8)
    others = torch.stack([torch.randn(30), logits[2], torch.randn(30)])
    batched = [sample_next(others, torch.tensor([0.3, 1.5, 2.0]), torch.tensor([3, 0, 1]),
                           torch.tensor([0.5, 0.9, 1.0]), g)[1].item() for _ in range(20)]
    assert alone == batched == [step[2] for step in runs[0]]

    # Draws taken ahead, a block per row (as deploy's decoder does), are the generators' draws.
    blocks = torch.stack([torch.rand(20, generator=g) for g in gens(1, 2, 3, 4)], dim=1)
    ahead = [sample_next(logits, temperature, top_k, top_p, uniforms=u).tolist() for u in blocks]
    assert ahead == runs[0]


def test_greedy_cases_equal_argmax():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    logits[0, [3, 7]] = 10.0  # a tie: argmax takes the lower id
    best = logits.argmax(dim=1)
    g = gens(*range(6))
    assert torch.equal(sample_next(logits, top_k=1, generator=g), best)
    assert torch.equal(sample_next(logits, temperature=0.0, generator=g), best)
    assert torch.equal(sample_next(logits, top_p=1e-6, generator=g), best)
    assert torch.equal(sample_next(logits, temperature=1e-30, generator=g), best)
    mixed = sample_next(logits, torch.tensor([0.0, 1, 1, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 1, 1]), generator=g)
    assert torch.equal(mixed, best)


def test_sampling_follows_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 40000
    g = torch.Generator().manual_seed(0)
    counts = lambda ids: torch.bincount(ids, minlength=4).float() / n
    full = counts(sample_next(logits.expand(n, 4), generator=g))
    torch.testing.assert_close(full, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.01, rtol=0)
    top2 = counts(sample_next(logits.expand(n, 4), top_k=2, generator=g))
    torch.testing.assert_close(top2, torch.tensor([0.625, 0.375, 0, 0]), atol=0.01, rtol=0)
    nucleus = counts(sample_next(logits.expand(n, 4), top_p=0.9, generator=g))  # 0.5+0.3 < 0.9
    torch.testing.assert_close(nucleus, torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.01, rtol=0)
    # top-p measures what top-k kept: of [0.625, 0.375], 0.6 is reached by the first token alone.
    both = counts(sample_next(logits.expand(n, 4), top_k=2, top_p=0.6, generator=g))
    torch.testing.assert_close(both, torch.tensor([1.0, 0, 0, 0]), atol=0, rtol=0)
    hot = counts(sample_next(logits.expand(n, 4), temperature=2.0, generator=g))
    torch.testing.assert_close(hot, torch.softmax(logits / 2, 0), atol=0.01, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be finite and >= 0"),
    ({"temperature": float("nan")}, "temperature must be finite"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_p": torch.tensor([0.5, 0.5])}, r"top_p must be a scalar or have one value per row \(3\)"),
    ({"generator": gens(1, 2)}, "a list of 3 \\(one per row\\)"),
    ({"uniforms": torch.rand(2)}, "uniforms must be a tensor of 3 draws"),
    ({"uniforms": torch.rand(3), "generator": gens(1, 2, 3)}, "a generator or uniforms, not both"),
])
def test_sample_next_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_next(torch.zeros(3, 5), **kwargs)


def test_sample_next_rejects_bad_logits():
    with pytest.raises(ValueError, match=r"logits must be \[batch, vocab\]"):
        sample_next(torch.zeros(5))


def test_score_in_lanes_is_one_streams_loss():
    from models import score

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=30, layers=2, hidden=32, dropout=0.0))
    ids = torch.randint(0, 30, (6001,)).tolist()
    one_stream = score(model, ids)
    # Burn-in back to the start: every lane sees exactly one stream's context.
    total, count = score(model, ids, lanes=5, burn_in=len(ids))
    assert count == one_stream[1] == 6000 and total == pytest.approx(one_stream[0], rel=1e-5)
    # Short burn-in: each piece misses some context, and the loss is still that of one stream.
    total, count = score(model, ids, lanes=8, burn_in=200)
    assert count == 6000 and total / count == pytest.approx(one_stream[0] / 6000, abs=0.01)
    # No burn-in at all leaves every piece but the first without its context: a real difference.
    assert score(model, ids, lanes=8, burn_in=0)[0] != pytest.approx(one_stream[0], rel=1e-6)


@needs_bf16
def test_score_in_bf16_is_close_to_float32_and_not_equal():
    from models import score

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=30, layers=2, hidden=32, dropout=0.0))
    ids = torch.randint(0, 30, (3001,)).tolist()
    fp32, count = score(model, ids, lanes=4)
    bf16, count_bf16 = score(model, ids, lanes=4, precision="bf16")
    assert count_bf16 == count == 3000
    assert bf16 != fp32  # it did run in bf16 ...
    assert bf16 / count == pytest.approx(fp32 / count, abs=0.01)  # ... with its loss summed in float32
    with pytest.raises(ValueError, match="precision"):
        score(model, ids, precision="fp16")
