"""Kernels chosen by measurement (`smollm_ref.fast.tuning`) and the weight layouts they choose between
(`smollm_ref.fast.packing`): every layout computes the same function, a choice is never slower than the
reference as measured, choices are remembered per process and on disk by machine, and choosing touches
no global state."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from conftest import tiny_config
from hypothesis import given
from hypothesis import strategies as st

from smollm_ref import storage
from smollm_ref.fast import LAYOUTS, FastForward, FastGenerator, choose_layouts, pack_weights, relayout, to_layout, tuning
from smollm_ref.fast.decode import StaticKVCache, forward_cached, rope_matrices
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


class Clock:
    """A clock that only the candidates move: each timing is what the test says it is, whatever the machine's
    speed or load (`tuning.fastest(..., clock=clock)`)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Counted:
    """A candidate that costs `seconds` on `clock` and counts its calls."""

    def __init__(self, clock: Clock, seconds: float):
        self.clock, self.seconds, self.calls = clock, seconds, 0

    def __call__(self):
        self.calls += 1
        self.clock.now += self.seconds


@pytest.fixture
def clock():
    return Clock()


def _stored(key: str) -> dict:
    return json.loads(tuning.cache_path().read_text())[tuning.machine_key()][key]


# the choice


@given(st.dictionaries(st.sampled_from(["ref", "a", "b", "c"]), st.floats(1e-6, 10.0), min_size=1).filter(lambda d: "ref" in d))
def test_pick_is_never_slower_than_the_reference_and_keeps_it_on_near_ties(seconds):
    choice = tuning.pick(seconds, "ref")
    assert seconds[choice] <= seconds["ref"]
    if choice != "ref":
        assert seconds[choice] < seconds["ref"] * (1 - tuning.MARGIN)
        assert seconds[choice] == min(seconds.values())
    elif min(seconds.values()) < seconds["ref"] * (1 - tuning.MARGIN):
        pytest.fail(f"{seconds}: a candidate faster by more than the margin was passed over")


def test_time_candidates_keeps_each_candidates_best_of_interleaved_calls(clock):
    order = []
    costs = {"a": iter([5.0, 2.0, 3.0]), "b": iter([1.0, 4.0, 0.5])}

    def candidate(name):
        def call():
            order.append(name)
            clock.now += next(costs[name])

        return call

    seconds = tuning.time_candidates({"a": candidate("a"), "b": candidate("b")}, repeats=3, warm=False, clock=clock)
    assert seconds == {"a": 2.0, "b": 0.5} and order == ["a", "b"] * 3


def test_fastest_times_once_per_process_and_picks_the_fastest(clock):
    slow, fast = Counted(clock, 0.004), Counted(clock, 0.0005)
    assert tuning.fastest("op x", {"ref": slow, "other": fast}, "ref", repeats=3, clock=clock) == "other"
    calls = (slow.calls, fast.calls)
    assert calls == (4, 4)  # one untimed call each, then 3 timed
    assert tuning.fastest("op x", {"ref": slow, "other": fast}, "ref", clock=clock) == "other"
    assert (slow.calls, fast.calls) == calls  # remembered, not timed again
    assert not tuning.cache_path().exists()  # cheap to time (13.5 ms on the clock): not written to disk
    near = Counted(clock, 0.004 * (1 - tuning.MARGIN / 2))
    assert tuning.fastest("op x2", {"ref": Counted(clock, 0.004), "near": near}, "ref", clock=clock) == "ref"


def test_costly_choices_are_kept_on_disk_by_machine_and_read_back(clock, monkeypatch):
    slow, fast = Counted(clock, 1.0), Counted(clock, 0.0)  # 2 s of timing: over PERSIST_AFTER_S
    assert tuning.fastest("op y", {"ref": slow, "other": fast}, "ref", repeats=2, clock=clock) == "other"
    machine = tuning.machine_key()
    assert tuning.cpu_model() in machine and torch.__version__ in machine
    assert _stored("op y")["choice"] == "other" and _stored("op y")["seconds"] == {"ref": 1.0, "other": 0.0}
    assert _stored("op y")["measured_in_s"] == 3.0  # the untimed calls count too
    tuning.forget()  # a new process: reads the disk, times nothing
    again_slow, again_fast = Counted(clock, 1.0), Counted(clock, 0.0)
    assert tuning.fastest("op y", {"ref": again_slow, "other": again_fast}, "ref", clock=clock) == "other"
    assert again_slow.calls == 0 and again_fast.calls == 1  # the stored choice is tried once: it still works here
    # Another machine (or torch, or thread count) does not take this machine's choice.
    monkeypatch.setattr(tuning, "machine_key", lambda device="cpu": "cpu|another CPU|torch 0|threads 2")
    tuning.forget()
    assert tuning.fastest("op y", {"ref": Counted(clock, 0.0), "other": Counted(clock, 1.0)}, "ref", clock=clock) == "ref"


def _costly(clock, key: str, repeats: int = 1) -> tuple[str, Counted]:
    """`fastest` over a reference costing 1 s and "other" costing nothing: "other", measured (a second of
    timing: written to disk)."""
    ref = Counted(clock, 1.0)
    return tuning.fastest(key, {"ref": ref, "other": Counted(clock, 0.0)}, "ref", repeats=repeats, clock=clock), ref


def test_a_corrupt_or_unwritable_cache_costs_a_measurement_not_the_run(clock, tmp_path, monkeypatch):
    tuning.cache_path().parent.mkdir(parents=True)
    tuning.cache_path().write_text("{ not json")
    assert _costly(clock, "op z")[0] == "other"
    assert _stored("op z")["choice"] == "other"
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SMOLLM_REF_CACHE", str(blocker / "below-a-file"))
    tuning.forget()
    assert _costly(clock, "op z")[0] == "other"


def _machine_part(value) -> str:
    return json.dumps({tuning.machine_key(): value})


@pytest.mark.parametrize(
    "whole, part",
    [
        pytest.param(b"[1, 2]", None, id="a list for the file"),
        pytest.param(None, ["op s"], id="a list for this machine's records"),
        pytest.param(None, {"op s": ["other"]}, id="a list for a record"),
        pytest.param(None, {"op s": {"choice": ["other"]}}, id="a list for a choice"),
        pytest.param(None, {"op s": {"choice": {"other": 1}}}, id="a mapping for a choice"),
        pytest.param(None, {"op s": {"seconds": {}}}, id="no choice"),
        pytest.param(None, {"op s": {"choice": "diagonal"}}, id="not a candidate"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, None, id="nested past the recursion limit"),
        pytest.param(b'{"\xff": 1}', None, id="not UTF-8"),
    ],
)
def test_a_malformed_cache_costs_a_measurement_and_is_replaced(clock, whole, part):
    """`whole`: the file's bytes; `part`: the value under this machine's key."""
    tuning.cache_path().parent.mkdir(parents=True)
    tuning.cache_path().write_bytes(whole if whole is not None else _machine_part(part).encode())
    choice, ref = _costly(clock, "op s")
    assert choice == "other" and ref.calls == 2  # measured: one untimed call, one timed
    assert _stored("op s")["choice"] == "other"  # the bad record (or file) replaced by the measurement
    tuning.forget()
    choice, ref = _costly(clock, "op s")
    assert choice == "other" and ref.calls == 0  # read back from the replaced file


def test_a_stored_choice_this_dtype_cannot_use_costs_a_measurement(clock):
    """A choice measured where oneDNN could reorder the weights, read where it cannot (another dtype or
    torch under the same key): the stored choice fails its trial call, the working candidates are timed."""
    tuning.cache_path().parent.mkdir(parents=True)
    tuning.cache_path().write_text(_machine_part({"op r": {"choice": "onednn"}}))

    def cannot():
        raise RuntimeError("oneDNN cannot reorder this dtype")

    ref = Counted(clock, 1.0)
    assert tuning.fastest("op r", {"ref": ref, "onednn": cannot, "other": Counted(clock, 0.0)}, "ref", clock=clock) == "other"
    assert ref.calls == 6 and _stored("op r")["choice"] == "other"


def test_a_cache_that_is_a_fifo_costs_a_measurement_not_a_hang(clock):
    """Reading a FIFO with no writer would block forever; it is refused without being opened for a read that
    waits (`storage.read_small_json`)."""
    tuning.cache_path().parent.mkdir(parents=True)
    os.mkfifo(tuning.cache_path())
    released = []

    def release():  # a read stuck on the FIFO gets end-of-file: the test fails instead of hanging
        try:
            os.close(os.open(tuning.cache_path(), os.O_WRONLY | os.O_NONBLOCK))
            released.append("a read waited on the FIFO")
        except OSError:  # no reader waiting
            pass

    watchdog = threading.Timer(30.0, release)
    watchdog.start()
    try:
        choice, ref = _costly(clock, "op q")
    finally:
        watchdog.cancel()
    assert released == [] and choice == "other" and ref.calls == 2
    assert _stored("op q")["choice"] == "other"  # the FIFO replaced by a file


def test_a_large_cache_is_parsed_once_per_process_and_a_too_large_one_not_at_all(clock, monkeypatch):
    parses = []
    parse = storage.loads_json
    monkeypatch.setattr(storage, "loads_json", lambda text, where: parses.append(where) or parse(text, where))
    others = {f"cpu|machine {i}|torch 0|threads 1": {f"op {j}": {"choice": "ref"} for j in range(40)} for i in range(300)}
    tuning.cache_path().parent.mkdir(parents=True)
    tuning.cache_path().write_text(
        json.dumps({**others, tuning.machine_key(): {f"op {j}": {"choice": "other"} for j in range(40)}})
    )
    assert 300_000 < tuning.cache_path().stat().st_size < tuning.CACHE_LIMIT
    for j in range(40):  # every kind of weight at every shape asks
        assert (
            tuning.fastest(f"op {j}", {"ref": Counted(clock, 1.0), "other": Counted(clock, 0.0)}, "ref", clock=clock) == "other"
        )
    assert len(parses) == 1
    assert _costly(clock, "op new")[0] == "other"  # a write: the new version is read once, at the next miss
    tuning.forget()
    assert _costly(clock, "op new")[1].calls == 0 and len(parses) == 2
    # Over the limit: refused unparsed, measured, replaced.
    tuning.cache_path().write_text(" " * (tuning.CACHE_LIMIT + 1))
    tuning.forget()
    parses.clear()
    assert _costly(clock, "op big")[1].calls == 2 and parses == []
    assert tuning.cache_path().stat().st_size < 1000 and _stored("op big")["choice"] == "other"


def test_a_choice_read_from_disk_must_be_a_candidate(clock):
    tuning.fastest("op w", {"ref": Counted(clock, 1.0), "gone": Counted(clock, 0.0)}, "ref", repeats=1, clock=clock)
    assert _stored("op w")["choice"] == "gone"
    tuning.forget()
    ref = Counted(clock, 0.0)
    assert tuning.fastest("op w", {"ref": ref, "new": Counted(clock, 1.0)}, "ref", repeats=1, clock=clock) == "ref"
    assert ref.calls == 2  # timed afresh


def test_a_candidate_that_fails_is_left_out_and_a_failing_reference_is_an_error(clock):
    def broken():
        raise RuntimeError("oneDNN cannot reorder this dtype")

    candidates = {"ref": Counted(clock, 0.002), "broken": broken, "other": Counted(clock, 0.0)}
    assert tuning.fastest("op u", candidates, "ref", repeats=1, clock=clock) == "other"
    with pytest.raises(RuntimeError, match="reorder"):
        tuning.fastest("op t", {"ref": broken, "other": Counted(clock, 0.0)}, "ref", repeats=1, clock=clock)


def test_tuning_off_means_the_reference_without_timing(clock, monkeypatch):
    monkeypatch.setenv("SMOLLM_REF_TUNING", "off")
    other = Counted(clock, 0.0)
    assert tuning.fastest("op v", {"ref": Counted(clock, 0.01), "other": other}, "ref", clock=clock) == "ref"
    assert other.calls == 0
    with pytest.raises(ValueError, match="reference 'nope'"):
        tuning.fastest("op v", {"ref": Counted(clock, 0.0)}, "nope")


# the layouts


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
            steps = [forward_cached(packed, model.config, cache, tokens[:, :7], 0, tables)]
            steps += [forward_cached(packed, model.config, cache, tokens[:, t : t + 1], t, tables) for t in range(7, 10)]
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


def _offered(monkeypatch) -> list[set[str]]:
    """The candidate names each `tuning.fastest` call is offered (recorded; the real `fastest` still chooses)."""
    offered, fastest = [], tuning.fastest
    monkeypatch.setattr(
        tuning, "fastest", lambda key, candidates, *a, **k: offered.append(set(candidates)) or fastest(key, candidates, *a, **k)
    )
    return offered


@pytest.mark.parametrize("rows", [1, 300])
def test_onednn_is_not_offered_where_torch_lacks_it(model, monkeypatch, rows):
    """What is offered, not what wins: a oneDNN candidate offered where torch lacks it would fail its first
    call and be dropped, so no choice could show it."""
    offered = _offered(monkeypatch)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with torch.no_grad():
        chosen = choose_layouts(pack_weights(model), rows)
    assert offered == [{"row-major", "column-major"}] * len(KINDS)
    assert set(chosen.values()) <= {"row-major", "column-major"}


def test_every_layout_this_torch_has_is_offered(model, monkeypatch):
    offered = _offered(monkeypatch)
    with torch.no_grad():
        choose_layouts(pack_weights(model), 1)
    assert offered == [set(LAYOUTS_HERE)] * len(KINDS)


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
