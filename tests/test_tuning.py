"""Kernels chosen by measurement (`smollm_ref.fast.tuning`) and the weight layouts they choose between
(`smollm_ref.fast.packing`): every layout computes the same function, a choice is never slower than the
reference as measured, choices are remembered per process and on disk by machine, and choosing touches
no global state."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from hypothesis import given
from hypothesis import strategies as st

from smollm_ref.fast import LAYOUTS, FastForward, FastGenerator, choose_layouts, pack_weights, relayout, to_layout, tuning
from smollm_ref.fast.decode import StaticKVCache, _forward_cached, rope_matrices
from smollm_ref.fast.forward import rope_table
from smollm_ref.fast.packing import KINDS, STREAMING_ROWS, TIMED_ROWS, onednn_available
from smollm_ref.generate import generate
from smollm_ref.model import LlamaForCausalLM

LAYOUTS_HERE = [name for name in LAYOUTS if name != "onednn" or onednn_available()]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SMOLLM_REF_TUNING", raising=False)
    tuning.forget()
    yield
    tuning.forget()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


class Counted:
    """A candidate that does nothing but sleep `seconds` and count its calls."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def __call__(self):
        import time

        self.calls += 1
        time.sleep(self.seconds)


# ---- the choice -------------------------------------------------------------------------------------


@given(st.dictionaries(st.sampled_from(["ref", "a", "b", "c"]), st.floats(1e-6, 10.0), min_size=1).filter(lambda d: "ref" in d))
def test_pick_is_never_slower_than_the_reference_and_keeps_it_on_near_ties(seconds):
    choice = tuning.pick(seconds, "ref")
    assert seconds[choice] <= seconds["ref"]
    if choice != "ref":
        assert seconds[choice] < seconds["ref"] * (1 - tuning.MARGIN)
        assert seconds[choice] == min(seconds.values())
    elif min(seconds.values()) < seconds["ref"] * (1 - tuning.MARGIN):
        pytest.fail(f"{seconds}: a candidate faster by more than the margin was passed over")


def test_fastest_times_once_per_process_and_picks_the_fastest():
    slow, fast = Counted(0.004), Counted(0.0005)
    assert tuning.fastest("op x", {"ref": slow, "other": fast}, "ref", repeats=3) == "other"
    calls = (slow.calls, fast.calls)
    assert calls == (4, 4)  # one untimed call each, then 3 timed
    assert tuning.fastest("op x", {"ref": slow, "other": fast}, "ref") == "other"
    assert (slow.calls, fast.calls) == calls  # remembered, not timed again
    assert not (tuning.cache_path()).exists()  # cheap to time: not written to disk


def test_costly_choices_are_kept_on_disk_by_machine_and_read_back(monkeypatch):
    monkeypatch.setattr(tuning, "PERSIST_AFTER_S", 0.0)
    slow, fast = Counted(0.003), Counted(0.0)
    assert tuning.fastest("op y", {"ref": slow, "other": fast}, "ref", repeats=2) == "other"
    stored = json.loads(tuning.cache_path().read_text())
    machine = tuning.machine_key()
    assert tuning.cpu_model() in machine and torch.__version__ in machine
    assert stored[machine]["op y"]["choice"] == "other" and set(stored[machine]["op y"]["seconds"]) == {"ref", "other"}
    tuning.forget()  # a new process: reads the disk, times nothing
    again_slow, again_fast = Counted(0.003), Counted(0.0)
    assert tuning.fastest("op y", {"ref": again_slow, "other": again_fast}, "ref") == "other"
    assert again_slow.calls == again_fast.calls == 0
    # Another machine (or torch, or thread count) does not take this machine's choice.
    monkeypatch.setattr(tuning, "machine_key", lambda device="cpu": "cpu|another CPU|torch 0|threads 2")
    tuning.forget()
    assert tuning.fastest("op y", {"ref": Counted(0.0), "other": Counted(0.003)}, "ref") == "ref"


def test_a_corrupt_or_unwritable_cache_costs_a_measurement_not_the_run(monkeypatch, tmp_path):
    monkeypatch.setattr(tuning, "PERSIST_AFTER_S", 0.0)
    tuning.cache_path().parent.mkdir(parents=True)
    tuning.cache_path().write_text("{ not json")
    assert tuning.fastest("op z", {"ref": Counted(0.003), "other": Counted(0.0)}, "ref", repeats=1) == "other"
    assert json.loads(tuning.cache_path().read_text())[tuning.machine_key()]["op z"]["choice"] == "other"
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(blocker / "below-a-file"))
    tuning.forget()
    assert tuning.fastest("op z", {"ref": Counted(0.003), "other": Counted(0.0)}, "ref", repeats=1) == "other"


def test_a_choice_read_from_disk_must_be_a_candidate(monkeypatch):
    monkeypatch.setattr(tuning, "PERSIST_AFTER_S", 0.0)
    tuning.fastest("op w", {"ref": Counted(0.003), "gone": Counted(0.0)}, "ref", repeats=1)
    tuning.forget()
    ref = Counted(0.0)
    assert tuning.fastest("op w", {"ref": ref, "new": Counted(0.003)}, "ref", repeats=1) == "ref"
    assert ref.calls == 2  # timed afresh


def test_a_candidate_that_fails_is_left_out_and_a_failing_reference_is_an_error():
    def broken():
        raise RuntimeError("oneDNN cannot reorder this dtype")

    assert tuning.fastest("op u", {"ref": Counted(0.002), "broken": broken, "other": Counted(0.0)}, "ref", repeats=1) == "other"
    with pytest.raises(RuntimeError, match="reorder"):
        tuning.fastest("op t", {"ref": broken, "other": Counted(0.0)}, "ref", repeats=1)


def test_tuning_off_means_the_reference_without_timing(monkeypatch):
    monkeypatch.setenv("SMOLLM_REF_TUNING", "off")
    other = Counted(0.0)
    assert tuning.fastest("op v", {"ref": Counted(0.01), "other": other}, "ref") == "ref"
    assert other.calls == 0
    with pytest.raises(ValueError, match="reference 'nope'"):
        tuning.fastest("op v", {"ref": Counted(0.0)}, "nope")


# ---- the layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS_HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_layout_gives_the_reference_logits(model, layout, dtype):
    """Prefill and decode through each kind of weight in `layout` against row-major (the reference layout)."""
    model = model.to(dtype)
    tokens = torch.randint(0, 256, (3, 10))
    with torch.no_grad():
        plain = pack_weights(model)
        laid = relayout(plain, dict.fromkeys(KINDS, layout))
    cos, sin = rope_table(model.config, 10, dtype, "cpu")
    tables = (cos, sin, rope_matrices(cos, sin))
    outs = []
    for packed in (plain, laid):
        cache = StaticKVCache(model.config, 3, 10, dtype, "cpu")
        with torch.no_grad():
            steps = [_forward_cached(packed, model.config, cache, tokens[:, :7], 0, tables)]
            steps += [_forward_cached(packed, model.config, cache, tokens[:, t : t + 1], t, tables) for t in range(7, 10)]
        outs.append(torch.stack(steps, 1))
    # Only the summation order differs: float32 rounding, or in bf16 an occasional one-ulp flip of a rounded
    # activation (2^-8 relative) carried through the later layers.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)


def test_layouts_keep_shape_and_values_and_refuse_unknown_names(model):
    w = model.lm_head.weight
    column = to_layout(w, "column-major")
    assert column.shape == w.shape and torch.equal(column, w) and column.stride() == (1, w.shape[0])
    assert to_layout(w, "row-major").data_ptr() == w.data_ptr()
    with pytest.raises(ValueError, match="unknown layout 'diagonal'"):
        to_layout(w, "diagonal")
    if not onednn_available():
        with pytest.raises(ValueError, match="oneDNN"):
            to_layout(w, "onednn")


@pytest.mark.parametrize("rows", [1, 8, 300])
def test_choose_layouts_names_a_layout_for_every_kind_and_leaves_the_rng_alone(model, rows):
    with torch.no_grad():
        packed = pack_weights(model)
    state = torch.get_rng_state()
    chosen = choose_layouts(packed, rows)
    assert torch.equal(torch.get_rng_state(), state)  # sampling and training draw from it
    assert set(chosen) == set(KINDS) and set(chosen.values()) <= set(LAYOUTS_HERE)
    timed_rows = rows if rows <= STREAMING_ROWS else min(TIMED_ROWS, 512)  # 300 rows: timed at 512
    assert any(f"rows {timed_rows} " in key for key in tuning.choices())


def test_choose_layouts_is_row_major_with_tuning_off(model, monkeypatch):
    monkeypatch.setenv("SMOLLM_REF_TUNING", "off")
    with torch.no_grad():
        assert choose_layouts(pack_weights(model), 1) == dict.fromkeys(KINDS, "row-major")


def test_onednn_is_not_offered_where_torch_lacks_it(model, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    monkeypatch.setattr(tuning, "pick", lambda seconds, reference, margin=tuning.MARGIN: max(seconds))
    with torch.no_grad():
        chosen = choose_layouts(pack_weights(model), 1)
    assert "onednn" not in chosen.values() and set(chosen.values()) <= {"row-major", "column-major"}


@pytest.mark.parametrize("forced", LAYOUTS_HERE)
def test_generator_and_logits_in_any_chosen_layout_match_the_reference(model, forced, monkeypatch):
    """Whatever the timing picks, eager decoding gives `generate`'s tokens and FastForward the model's logits."""
    monkeypatch.setattr(tuning, "pick", lambda seconds, reference, margin=tuning.MARGIN: forced)
    prompt = torch.randint(0, 256, (2, 5))
    gen = FastGenerator(model)
    assert torch.equal(gen.generate(prompt, 6, eos_token_id=[]), generate(model, prompt, 6, eos_token_id=[]))
    qkv = gen.packed(2).layers[0].qkv
    assert qkv.is_mkldnn == (forced == "onednn")
    if forced != "onednn":
        assert qkv.stride() == ((1, qkv.shape[0]) if forced == "column-major" else (qkv.shape[1], 1))
    with torch.no_grad():
        torch.testing.assert_close(FastForward(model).logits(prompt), model(prompt).logits, rtol=1e-5, atol=1e-5)
    assert not FastGenerator(model, compile=True).packed(2).lm_head.is_mkldnn  # compile takes plain tensors
