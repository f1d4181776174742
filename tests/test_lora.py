"""LoRA through peft (issue 21): the adapted model computes what transformers + peft compute with the same adapter
weights (forward and gradients, exactly), only the adapters train (rank x (in + out) parameters per adapted linear),
a merged model equals the adapted one to the merge's rounding, checkpoints hold the adapter in peft's own format
(PeftModel.from_pretrained on transformers' model loads it) and a record of the base instead of its weights, a LoRA
run resumes bit for bit, `convert`, `generate` and the demo take a LoRA run, LoRA trains text, chat and preference
data with the reference of DPO the base under the adapters, and bad input is one line that writes nothing."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from trainer_runs import FORMAT1, argv, losses, one_line_error, tiny_options, tree

from smollm_ref import checkpoint, distributed, lora, train
from smollm_ref.config import ModelConfig
from smollm_ref.convert import hf_config, to_transformers
from smollm_ref.model import LlamaForCausalLM
from smollm_ref.train.objectives.preference import reference_logps
from smollm_ref.train.options import ModelOptions
from smollm_ref.train.step import fast_step_unsupported
from smollm_ref.weights import from_directory, load_checkpoint, save_pretrained

REPO = Path(__file__).resolve().parent.parent
BASE = FORMAT1 / "step_000002"  # the base of the tiny text runs: vocab 320, 2 layers of width 32, its own tokenizer
EPS = torch.finfo(torch.float32).eps
# A merged linear computes fl((W + s B A) x) where the adapted one computes fl(W x) + s fl(B fl(A x)): float32 sums
# in another order, a few ulp per adapted linear, 14 of them over 2 layers. Measured 8 ulp of the largest logit
# (tiny_config, rank 4, adapters of scale 0.1); allowed 64. A wrong scale or a linear left out moves them by ~1e-1.
MERGE_ULPS = 64


def adapted_twins(spec: lora.LoraSpec):
    """(ours, transformers + peft's): a tiny GQA model with `spec`'s adapters, their weights random (B too, so
    that the adapters change the output and A has a gradient), and transformers' twin with peft's get_peft_model
    and the same adapter weights."""
    from peft import get_peft_model
    from peft.functional import get_peft_model_state_dict, set_peft_model_state_dict

    ours = LlamaForCausalLM(tiny_config()).train()
    theirs = to_transformers(ours).train()
    lora.attach(ours, spec)
    state = {k: 0.1 * torch.randn_like(v) for k, v in lora.adapter_state(ours).items()}
    lora.load_adapter_state(ours, state)
    theirs = get_peft_model(theirs, spec.peft_config())
    assert set(get_peft_model_state_dict(theirs)) == set(state)  # the saved format's names, on both sides
    assert not set_peft_model_state_dict(theirs, state).unexpected_keys
    return ours, theirs


SPECS = {
    "all linears, rank 4": lora.LoraSpec(4, 8.0),
    "attention q and v, rank 2, alpha 5": lora.LoraSpec(2, 5.0, targets=("q_proj", "v_proj")),
    "mlp, rank 3": lora.LoraSpec(3, 1.0, targets=("gate_proj", "up_proj", "down_proj")),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_forward_and_adapter_gradients_equal_transformers_with_peft(name):
    """The same LoraConfig and adapter weights on transformers' LlamaForCausalLM through get_peft_model: the same
    logits, loss and gradient of every adapter weight, exactly (the two models are bit-identical in float32 on the
    CPU, tests/test_model.py, and the adapters are peft's own layers on both); the base has no gradient."""
    ours, theirs = adapted_twins(SPECS[name])
    ids = torch.randint(0, 256, (2, 17))
    labels = ids.clone()
    labels[0, :3] = -100
    a, b = ours(ids, labels=labels), theirs(input_ids=ids, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    a.loss.backward(), b.loss.backward()
    grads = dict(theirs.named_parameters())
    trained = 0
    for param_name, p in ours.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, param_name
            continue
        assert "lora_" in param_name
        torch.testing.assert_close(p.grad, grads[lora.PEFT_PREFIX + param_name].grad, rtol=0, atol=0, msg=param_name)
        trained += 1
    assert trained == 2 * 2 * len(SPECS[name].targets)  # A and B of each target in each of the 2 layers


@pytest.mark.parametrize("name", list(SPECS))
def test_trainable_parameters_are_rank_times_in_plus_out_over_the_adapted_linears(name):
    spec = SPECS[name]
    c = tiny_config()
    heads, kv, head, hidden, inner = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size
    shapes = {  # (in, out) of each linear of a decoder layer
        "q_proj": (hidden, heads * head), "k_proj": (hidden, kv * head), "v_proj": (hidden, kv * head),
        "o_proj": (heads * head, hidden), "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden),
    }  # fmt: skip
    expected = c.num_hidden_layers * sum(spec.rank * sum(shapes[t]) for t in spec.targets)
    model = LlamaForCausalLM(c)
    assert lora.attach(model, spec) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(p.numel() for p in model.parameters()) == c.num_parameters() + expected


def test_a_merged_model_computes_what_the_adapted_one_does():
    ours, _ = adapted_twins(SPECS["all linears, rank 4"])
    ours.eval()
    merged = lora.merge(copy.deepcopy(ours))
    assert not lora.adapted(merged) and not hasattr(merged, "peft_config")
    assert set(merged.state_dict()) == set(LlamaForCausalLM(tiny_config()).state_dict())  # a plain model's names
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        adapted, plain = ours(ids).logits, merged(ids).logits
    with lora.adapters_disabled(ours), torch.no_grad():
        base = ours(ids).logits
    assert (adapted - base).abs().max() > 1e-2  # the adapters matter, so a merge that drops them fails
    torch.testing.assert_close(plain, adapted, rtol=0, atol=MERGE_ULPS * EPS * float(adapted.abs().max()))


def test_the_fast_step_is_refused_with_the_reason_when_the_model_holds_adapters():
    model = LlamaForCausalLM(tiny_config())
    assert fast_step_unsupported(model, ModelOptions(), 1, "bf16-mixed") is None
    lora.attach(model, lora.LoraSpec(2, 4.0))
    assert fast_step_unsupported(model, ModelOptions(), 1, "bf16-mixed").startswith("LoRA: the fast step packs")


def test_the_reference_of_dpo_is_the_base_under_the_adapters():
    """`reference_logps` on a model with (trained, non-zero) adapters gives the base model's log-probabilities, and
    leaves the adapters on."""
    from smollm_ref.data.preferences import PreferenceRows

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    model = copy.deepcopy(base)
    lora.attach(model, lora.LoraSpec(4, 8.0))
    lora.load_adapter_state(model, {k: 0.1 * torch.randn_like(v) for k, v in lora.adapter_state(model).items()})
    ids = [torch.randint(3, 256, (n,)).tolist() for n in (9, 12, 7, 10)]
    rows = PreferenceRows(prompt=[ids[0][:3], ids[1][:4]], chosen=[ids[0][3:], ids[1][4:]], rejected=[ids[2], ids[3]], pad_id=0)
    one = distributed.Dist()
    got = reference_logps(model, rows, 2, "cpu", contextlib.nullcontext(), one)
    torch.testing.assert_close(got, reference_logps(base, rows, 2, "cpu", contextlib.nullcontext(), one), rtol=0, atol=0)
    policy = reference_logps(lora.merge(copy.deepcopy(model)), rows, 2, "cpu", contextlib.nullcontext(), one)
    assert (policy - got).abs().max() > 1e-2  # with the adapters on, another model
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def lora_options(tmp_path: Path, **changes) -> dict:
    """A 4-step LoRA run on the tiny format1 base (its checkpoint directory as --init-from)."""
    return tiny_options(tmp_path, **{"init_from": str(BASE), "model_config": None, "lora_rank": 4, "lr": 1e-2, **changes})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    assert train.main(argv(lora_options(out))) == 0
    return out / "run"


def test_a_lora_checkpoint_is_peft_format_and_loads_in_transformers_with_peft(lora_run, tmp_path):
    """The adapter has exactly the keys PeftModel.save_pretrained writes for transformers' LlamaForCausalLM, and
    PeftModel.from_pretrained(transformers' base, checkpoint) computes our adapted model's logits; the checkpoint
    holds the adapter and a record of the base, not the base's weights."""
    import transformers
    from peft import PeftModel, get_peft_model

    ckpt = lora_run / "checkpoints" / "step_000004"
    checkpoint.verify(ckpt)
    names = {p.name for p in ckpt.iterdir()}
    assert {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS, lora.BASE_RECORD, "config.json"} <= names
    assert "model.safetensors" not in names
    spec = lora.LoraSpec.read(ckpt)
    assert spec == lora.LoraSpec(4, 8.0)  # alpha 2 x rank by default
    base = lora.Base.read(ckpt)
    assert (base.source, base.path) == (str(BASE), str(BASE.resolve()))
    assert base.sha256 == lora.weights_digest(from_directory(BASE).state_dict())

    config = ModelConfig.from_json(BASE / "config.json")
    peft_written = tmp_path / "peft"
    get_peft_model(transformers.LlamaForCausalLM(hf_config(config)), spec.peft_config()).save_pretrained(peft_written)
    adapter = load_file(ckpt / lora.ADAPTER_WEIGHTS)
    assert sorted(adapter) == sorted(load_file(peft_written / lora.ADAPTER_WEIGHTS))
    assert all(v.dtype == torch.float32 for v in adapter.values())
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained

    theirs = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(BASE), ckpt).eval()
    ours = from_directory(BASE)
    lora.attach(ours, spec, lora.read_adapter(ckpt))
    ids = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        a, b = ours.eval()(ids).logits, theirs(input_ids=ids).logits
        merged = load_checkpoint(ckpt)(ids).logits  # what generate, the demo and convert load
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(merged, a, rtol=0, atol=MERGE_ULPS * EPS * float(a.abs().max()))


def test_convert_writes_a_merged_transformers_directory_and_generate_takes_either(lora_run, tmp_path, capsys):
    import transformers

    from smollm_ref.demo import load_demo
    from smollm_ref.generate import main as generate

    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "smollm_ref.convert", "--model", str(lora_run), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ids = torch.randint(0, 320, (2, 20))
    merged = load_checkpoint(checkpoint.find(lora_run))
    with torch.no_grad():
        hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()(ids).logits
        torch.testing.assert_close(hf, merged(ids).logits, rtol=0, atol=0)  # the same weights, written and read
    replies = {}
    for name, source in (("lora", lora_run), ("merged", out)):
        assert generate(["--model", str(source), "--prompt", "def f(x):", "--max-new-tokens", "12"]) == 0
        replies[name] = capsys.readouterr().out
    assert replies["lora"] == replies["merged"] and len(replies["lora"]) > len("def f(x):\n")
    demo = load_demo(checkpoint=str(lora_run))
    assert demo.step == 4 and all(
        torch.equal(a, b) for a, b in zip(demo.model.state_dict().values(), merged.state_dict().values())
    )
    assert subprocess.run([sys.executable, "-m", "smollm_ref.convert", "--model", str(lora_run), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300).returncode == 2  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        {"precision": "fp32", "lora_dropout": 0.1},
        {"precision": "bf16-mixed", "grad_accum": 2, "lr_schedule": "cosine", "warmup_steps": 2, "lora_targets": "q_proj,v_proj"},
    ],
    ids=["fp32-dropout", "bf16-accum-cosine-qv"],
)
def test_a_lora_run_resumes_bit_for_bit(tmp_path, extra, capsys):
    """The tests/test_train.py resume test for LoRA: n steps straight, or n/2 then --resume in a new process for the
    rest, give the same loss at every step, the same adapter and the same AdamW state; the dropout's random draws
    resume too."""
    n = 6
    common = lora_options(tmp_path / "x", max_steps=n, checkpoint_every=n // 2, lr_decay_steps=n, **extra)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(argv({**common, "out_dir": straight})) == 0
    assert train.main(argv({**common, "out_dir": split, "max_steps": n // 2})) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    resume = ["--resume", str(split), "--additional-steps", str(n // 2), "--no-progress"]
    done = subprocess.run(
        [sys.executable, "-m", "smollm_ref.train", *resume], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "resumed from" in done.stderr, done.stderr[-2000:]
    if extra["precision"] == "bf16-mixed":  # where the fast step would be taken, it is refused with its reason
        assert "reference step (LoRA: the fast step packs" in capsys.readouterr().err
    a, b = losses(straight), losses(split)
    assert list(a) == list(b) == list(range(1, n + 1))
    assert a == b  # the same float at every step
    final = f"checkpoints/{checkpoint.step_dir_name(n)}"
    wa, wb = load_file(straight / final / lora.ADAPTER_WEIGHTS), load_file(split / final / lora.ADAPTER_WEIGHTS)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = checkpoint.load_state(straight / final), checkpoint.load_state(split / final)
    assert sa["data_position"] == sb["data_position"] and sa["tokens"] == sb["tokens"]
    assert len(sa["optimizer"]["state"]) == len(wa)  # AdamW holds the adapter's weights only
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert lora.Base.read(straight / final) == lora.Base.read(split / final)


CHATML = (  # ChatML, SmolLM2's chat format, without its default system prompt
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_base(directory: Path) -> Path:
    """A tiny random base that talks in ChatML: format1's model and tokenizer with <|im_start|> and <|im_end|> added
    (SmolLM2's own tokenizer would make it a 49,152-token vocabulary, read from a GGUF file: seconds per run)."""
    from smollm_ref.tokenizer import from_directory as tokenizer_from

    tok = tokenizer_from(BASE)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    config = ModelConfig.from_dict({**json.loads((BASE / "config.json").read_text()), "vocab_size": 384})
    torch.manual_seed(0)
    save_pretrained(LlamaForCausalLM(config), directory, tok)
    return directory


def test_lora_trains_chat_and_preference_data_on_a_frozen_base(tmp_path, capsys):
    """Chat and preference objectives with LoRA on a tiny ChatML model: the loss falls, only the adapter is saved,
    and a preference run starts where the policy is its reference (every pair's loss ln 2: peft's B = 0, and the
    reference is the base under the adapters), then learns (margins > 0)."""
    import math

    base = chat_base(tmp_path / "base")
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                                     {"role": "assistant", "content": f"{i} + {i} is {2 * i}."}]}) + "\n"
                            for i in range(24)))  # fmt: skip
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} squared?"}],
                                         "chosen": [{"role": "assistant", "content": f"{i * i}."}],
                                         "rejected": [{"role": "assistant", "content": f"It is {i + 1}, I think."}]}) + "\n"
                             for i in range(12)))  # fmt: skip
    common = dict(init_from=str(base), lora_rank=8, seq_len=64, batch_size=2, max_steps=4, checkpoint_every=4,
                  eval_every=4, val_fraction=0.2, log_every=100, sample_tokens=4, progress=False, lr=1e-2, precision="fp32")  # fmt: skip
    assert train.main(argv({**common, "data": str(chat), "out_dir": str(tmp_path / "chat")})) == 0
    assert train.main(argv({**common, "data": str(pairs), "out_dir": str(tmp_path / "dpo"), "beta": 0.2})) == 0
    live = {**common, "data": str(pairs), "out_dir": str(tmp_path / "dpo-live"), "beta": 0.2, "reference": "live"}
    assert train.main(argv(live)) == 0
    err = capsys.readouterr().err
    assert "chat data" in err and "preference data (conversations)" in err
    assert err.count("LoRA through peft: rank 8, alpha 16") == 3
    assert "live reference: the base under the LoRA adapters" in err  # no frozen copy
    records = {}
    for name in ("chat", "dpo", "dpo-live"):
        records[name] = {}
        for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines()):
            records[name].setdefault(r["step"], {}).update(r)
        ckpt = tmp_path / name / "checkpoints" / "step_000004"
        assert not (ckpt / "model.safetensors").exists() and lora.Base.read(ckpt).path == str(base.resolve())
    chat_steps, dpo_steps = records["chat"], records["dpo"]
    assert chat_steps[4]["val_loss"] < chat_steps[0]["val_loss"]
    # the policy is its reference to the float32 rounding of a forward in another batch (tests/test_dpo.py's bound)
    start = 0.2 * 4 * 64 * EPS * math.log(384)
    assert abs(dpo_steps[1]["loss"] - math.log(2)) <= start and abs(dpo_steps[0]["val_rewards/margins"]) <= 2 * start
    assert dpo_steps[4]["rewards/margins"] > 0 and dpo_steps[4]["loss"] < math.log(2)
    # --reference live with LoRA scores each micro-batch by the base under the adapters: the same rewards as the
    # reference precomputed before step 1 (to the rounding of forwards in other batches), not the trained policy's 0
    for step in (1, 4):
        for key in ("loss", "rewards/margins", "rewards/chosen"):
            assert records["dpo-live"][step][key] == pytest.approx(dpo_steps[step][key], rel=1e-4, abs=start)


def test_the_lora_quick_start_is_the_chat_quick_start_with_adapters():
    """sft-lora-quickstart and sft-quickstart differ in the adapters, their learning rate and where they write: the
    same data, steps, batches and schedule, so their validation losses and memory compare."""
    full, adapted = train.read_recipe("sft-quickstart"), train.read_recipe("sft-lora-quickstart")
    assert {k for k in full.keys() | adapted.keys() if full.get(k) != adapted.get(k)} == {
        "out_dir", "lr", "lora_rank", "optimizer_state",
    }  # fmt: skip
    cfg = train.TrainConfig.from_options(**adapted)
    assert lora.LoraSpec.from_options(cfg.lora) == lora.LoraSpec(8, 16.0, 0.0, lora.TARGETS)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """DDP and LoRA: two ranks of 2 windows a step train the adapter one process trains on 4 (gradients of the
    adapter only are reduced; the frozen base has none)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = lora_options(tmp_path / "x", max_steps=3, checkpoint_every=3, precision="fp32")
    for name, batch_size, prefix in (
        ("one", 4, []),
        ("two", 2, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]),
    ):
        opts = {**common, "out_dir": str(tmp_path / name), "batch_size": batch_size}
        done = subprocess.run(
            [sys.executable, *prefix, "-m", "smollm_ref.train", *argv(opts)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(a) == list(b) == [1, 2, 3]
    for step in a:  # the ranks' gradients are summed in another order (tests/test_train.py: 1 ulp measured)
        assert b[step] == pytest.approx(a[step], rel=5e-7, abs=0)
    assert checkpoint.load_state(tmp_path / "two" / "checkpoints" / "step_000003")["world_size"] == 2
    wa, wb = (load_file(tmp_path / r / "checkpoints" / "step_000003" / lora.ADAPTER_WEIGHTS) for r in ("one", "two"))
    lr = common["lr"]  # Adam's step on a gradient near 0 depends on summation order (tests/test_train.py's bound)
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 0.01 * lr


def _changed_base(tmp_path: Path) -> Path:
    """A copy of the tiny base, to be changed after a run adapted it."""
    copy_dir = tmp_path / "base"
    copy_dir.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (copy_dir / name).write_bytes((BASE / name).read_bytes())
    return copy_dir


def test_a_lora_checkpoint_whose_base_changed_is_refused(tmp_path, capsys):
    base = _changed_base(tmp_path)
    assert train.main(argv(lora_options(tmp_path, init_from=str(base), max_steps=2))) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    weights = load_file(base / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    before = tree(run)
    assert train.main(["--resume", str(run), "--additional-steps", "1", "--no-progress"]) == 2
    assert "no longer holds the weights its run adapted" in one_line_error(capsys)
    assert tree(run) == before
    from smollm_ref.generate import main as generate

    assert generate(["--model", str(run), "--prompt", "def"]) == 2
    assert "no longer holds the weights its run adapted" in one_line_error(capsys)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    assert train.main(argv(tiny_options(out, max_steps=2))) == 0
    return out / "run"


BAD = {
    "targets matching no module": (
        {"lora_targets": "q_proj,qkv_proj"},
        r"lora_targets \(--lora-targets\) must be comma-separated linears",
    ),
    "a target twice": ({"lora_targets": "q_proj,q_proj"}, r"lora_targets \(--lora-targets\) must be comma-separated linears"),
    "rank below 0": ({"lora_rank": -1}, r"lora_rank \(--lora-rank\) must be an integer >= 0"),
    "alpha without rank": ({"lora_rank": 0, "lora_alpha": 8}, r"--lora-alpha 8 needs --lora-rank: LoRA is off at --lora-rank 0"),
    "alpha 0": ({"lora_alpha": 0}, r"lora_alpha \(--lora-alpha\) must be a finite number > 0"),
    "alpha below 0": ({"lora_alpha": -4}, r"lora_alpha \(--lora-alpha\) must be a finite number > 0"),
    "dropout 1": ({"lora_dropout": 1.0}, r"lora_dropout \(--lora-dropout\) must be a number in \[0, 1\)"),
    "dropout below 0": ({"lora_dropout": -0.1}, r"lora_dropout \(--lora-dropout\) must be a number in \[0, 1\)"),
    "no base": ({"init_from": None, "model_config": str(BASE / "config.json")}, "--lora-rank needs --init-from"),
    "fsdp": ({"fsdp": True}, "--lora-rank with --fsdp is not supported"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lora_options_are_one_line_and_write_nothing(case, tmp_path, capsys):
    changes, message = BAD[case]
    opts = {**lora_options(tmp_path / "x"), "out_dir": str(tmp_path / "run"), **changes}
    before = sorted(p.name for p in tmp_path.iterdir())
    assert train.main(argv(opts)) == 2
    assert __import__("re").search(message, one_line_error(capsys))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory


RESUMES = {
    "a LoRA run without LoRA": ("lora", ["--lora-rank", "0"], r"holds a LoRA adapter \(rank 4, alpha 8, dropout 0, on q_proj"),
    "a LoRA run with another rank": (
        "lora",
        ["--lora-rank", "8"],
        "holds a LoRA adapter of rank 4, alpha 8, .* not rank 8, alpha 16",
    ),
    "a LoRA run with another alpha": ("lora", ["--lora-alpha", "4"], "not rank 4, alpha 4"),
    "a LoRA run with other targets": ("lora", ["--lora-targets", "q_proj"], "not rank 4, alpha 8, dropout 0, on q_proj:"),
    "a full run with LoRA": ("full", ["--lora-rank", "4"], "is of a run without LoRA .* so --lora-rank 4 cannot resume it"),
}


@pytest.mark.parametrize("case", list(RESUMES))
def test_resuming_with_other_lora_is_refused_in_one_line_before_anything_is_written(case, lora_run, full_run, capsys):
    which, flags, message = RESUMES[case]
    run = lora_run if which == "lora" else full_run
    before = tree(run)
    assert train.main(["--resume", str(run), "--additional-steps", "1", "--no-progress", *flags]) == 2
    assert __import__("re").search(message, one_line_error(capsys))
    assert tree(run) == before


def test_a_run_without_lora_never_imports_peft(tmp_path):
    """peft is imported only where LoRA is used (the GPU machine may lack it): a run without LoRA, its checkpoint
    loaded again as a model, leaves it out of sys.modules."""
    code = (
        "import sys\n"
        "from smollm_ref import train, weights\n"
        # bf16-mixed: the step's choice (fast or reference) asks whether the model holds adapters
        f"assert train.main({argv(tiny_options(tmp_path, max_steps=1, checkpoint_every=1, precision='bf16-mixed'))!r}) == 0\n"
        f"weights.from_pretrained({str(tmp_path / 'run')!r})\n"
        "assert 'peft' not in sys.modules, 'peft imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
