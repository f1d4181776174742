"""Generation on tiny random models: greedy against a no-cache loop, left padding, EOS, sampling controls."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smollm_ref.fast
from smollm_ref.generate import TextStream, generate, sample_next, stream
from smollm_ref.model import LlamaForCausalLM
from tests.conftest import tiny_config


@pytest.fixture
def model():
    return LlamaForCausalLM(tiny_config(eos_token_id=None)).eval()


def greedy_without_cache(model, ids, n):
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_greedy_equals_full_forward_loop(model):
    ids = torch.randint(3, 256, (2, 7))
    assert generate(model, ids, 20).tolist() == greedy_without_cache(model, ids, 20).tolist()


def test_left_padded_batch_gives_each_row_its_own_tokens(model):
    prompts = [torch.randint(3, 256, (n,)) for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    batched = generate(model, ids, 12, attention_mask=mask)[:, width:]
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], 12)[0, len(p) :]
        assert batched[i].tolist() == alone.tolist(), f"row {i}"


def test_stops_at_eos_and_pads_finished_rows():
    model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, 256, (2, 5))
    free = generate(model, ids, 10, eos_token_id=[])[:, 5:].tolist()
    eos = free[0][2]  # make a token row 0 produces the EOS

    def until_eos(row, length):  # the row up to and including its first EOS, then EOS padding
        cut = row.index(eos) + 1 if eos in row else len(row)
        return (row[:cut] + [eos] * length)[:length]

    out = generate(model, ids, 10, eos_token_id=eos)[:, 5:].tolist()
    stop = max(until_eos(r, 10).index(eos) + 1 if eos in r else 10 for r in free)
    assert len(out[0]) == stop  # ran until the last row finished
    assert out == [until_eos(r, stop) for r in free]
    single = generate(model, ids[:1], 10, eos_token_id=eos)[0, 5:].tolist()
    assert single == free[0][: free[0].index(eos) + 1]  # stopped as soon as the only row finished


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    ids = torch.randint(3, 256, (1, 4))
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = generate(model, ids, 10, temperature=1.0, generator=g())
    b = generate(model, ids, 10, temperature=1.0, generator=g())
    assert a.tolist() == b.tolist()
    assert generate(model, ids, 10, temperature=0.8, top_k=1, generator=g()).tolist() == generate(model, ids, 10).tolist()
    assert generate(model, ids, 10, temperature=0.8, top_p=1e-6, generator=g()).tolist() == generate(model, ids, 10).tolist()


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    draws = {int(sample_next(logits, 1.0, top_p=float(probs[0] + probs[1]) - 1e-3, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}


def test_stream_yields_one_token_per_step(model):
    ids = torch.randint(3, 256, (2, 4))
    steps = list(stream(model, ids, 5))
    assert len(steps) == 5 and all(s.shape == (2,) for s in steps)
    assert torch.stack(steps, 1).tolist() == generate(model, ids, 5)[:, 4:].tolist()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=1000), "positions"),
        (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=2, top_k=0), "top_k"),
        (dict(max_new_tokens=2, top_p=1.5), "top_p"),
    ],
)
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, torch.ones(1, 3, dtype=torch.long), **kwargs)


def test_empty_prompt_is_an_error(model):
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, torch.ones(1, 0, dtype=torch.long), 3)


def test_fast_path_never_imports_the_reference_loop():
    """Data flows one way: `generate` may call into `fast`, never the reverse; both take their argument
    check and sampler from `sampling`."""
    root = Path(smollm_ref.fast.__file__)
    files = sorted(root.parent.glob("*.py")) if root.name == "__init__.py" else [root]
    for path in files:
        modules = {node.module for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)}
        assert not {m for m in modules if m and m.lstrip(".").split(".")[0] == "generate"}, path


class ByteTokenizer:
    """Token i is byte i: random tokens make broken UTF-8, as a real tokenizer's byte-fallback tokens can."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_shows_whole_characters_and_stops_before_eos(model):
    ids = torch.tensor([[0xE2, 0x82]])
    free = generate(model, ids, 30, eos_token_id=[])[0, 2:].tolist()
    out = TextStream(model, ByteTokenizer(), ids, 30, eos_token_id=[])
    texts = list(out)
    assert out.tokens == free and len(texts) == 30 and not out.hit_eos
    assert out.text == bytes(free).decode("utf-8", errors="replace") and out.rate > 0
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before) and not after.endswith("\ufffd")
    eos = free[5]
    out = TextStream(model, ByteTokenizer(), ids, 30, eos_token_id=[eos])
    assert len(list(out)) == free.index(eos) and out.tokens == free[: free.index(eos)] and out.hit_eos
    with pytest.raises(ValueError, match="one prompt"):
        TextStream(model, ByteTokenizer(), torch.zeros(2, 3, dtype=torch.long), 4)


@pytest.mark.parametrize("command", ["smollm_ref.generate", "smollm_ref.demo", "smollm_ref.summary", "smollm_ref.plot"])
def test_commands_start_without_a_warning(command):
    """`python -m smollm_ref.generate` once warned that the module it runs was already imported by the package."""
    out = subprocess.run([sys.executable, "-W", "error", "-m", command, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m " + command), out.stderr
    assert "Warning" not in out.stderr, out.stderr


def test_package_exports_the_generate_function_whatever_is_imported_first():
    import importlib

    import smollm_ref
    import smollm_ref.demo  # noqa: F401  (imports smollm_ref.generate, the module)

    module = importlib.import_module("smollm_ref.generate")
    assert module is not generate and smollm_ref.generate is generate is module.generate
