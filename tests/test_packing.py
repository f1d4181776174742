"""Packing several conversations into one row changes nothing: the reference model's packed forward against
each conversation run alone and against transformers' packed forward; the summed SFT loss against
transformers' loss; and `smollm_ref.data.chat.pack` losing, duplicating or leaking no label. fp32, CPU, tiny configs.

Measured (torch 2.13 CPU): packed logits equal the separate runs' within 1.2e-6 (logits up to 2.6, 400 random
splits) but not bit for bit (the matmuls and SDPA see a longer row, and a boolean mask instead of `is_causal`):
PACKED_ATOL; loss sums (up to ~130) differ by float32 summation order, 1 ulp measured: SUM_RTOL. They equal
transformers' packed logits, loss and gradients bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.masking_utils import find_packed_sequence_indices

from smollm_ref.convert import to_transformers
from smollm_ref.data.chat import IGNORE_INDEX, pack
from smollm_ref.model import LlamaForCausalLM, causal_lm_loss, causal_lm_loss_sum, packed_causal_mask
from tests.conftest import tiny_config

VOCAB = 256
PACKED_ATOL = 3e-6  # packed logits against each conversation alone (measured at most 1.2e-6)
SUM_RTOL = 2.4e-7  # summed losses in another order: 2-4 float32 ulps (measured 1 ulp, 3.8e-6 at 52)


def twins(**changes):
    """Our tiny model and transformers' twin, built through the production converter."""
    torch.manual_seed(0)
    ours = LlamaForCausalLM(tiny_config(**changes)).eval()
    return ours, to_transformers(ours).eval()


@pytest.fixture(scope="module")
def models():
    return twins()


def positions(lengths) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]  # (1, T)


def conversation_labels(ids: torch.Tensor, trained: float = 0.6) -> torch.Tensor:
    """Labels of one conversation as `pack` leaves them: some tokens trained, the first never."""
    labels = torch.where(torch.rand(ids.shape) < trained, ids, IGNORE_INDEX)
    labels[..., 0] = IGNORE_INDEX
    return labels


def test_packed_causal_mask_is_block_diagonal():
    mask = packed_causal_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected[None, None])


def test_one_sequence_per_row_needs_no_mask():
    assert packed_causal_mask(torch.arange(7)[None]) is None
    assert packed_causal_mask(torch.arange(3, 10)[None].expand(2, -1)) is None  # a later window of one sequence


@given(st.lists(st.lists(st.integers(0, 5), min_size=6, max_size=6), min_size=1, max_size=3))
def test_sequences_are_split_where_transformers_splits_them(rows):
    """Same sequences as transformers' find_packed_sequence_indices, for any position ids, packed or not."""
    position_ids = torch.tensor(rows)
    theirs = find_packed_sequence_indices(position_ids)
    mask = packed_causal_mask(position_ids)
    assert (mask is None) == (theirs is None)
    if theirs is not None:
        same = theirs[:, :, None] == theirs[:, None, :]
        assert torch.equal(mask[:, 0], same & torch.ones(6, 6, dtype=torch.bool).tril())


def test_plain_positions_keep_the_plain_path_bit_for_bit(models):
    ours, _ = models
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        assert torch.equal(ours(ids, position_ids=torch.arange(19)[None]).logits, ours(ids).logits)


@pytest.mark.parametrize("lengths", [[5, 9, 3, 7], [1, 12, 1], [16]])
def test_a_packed_row_equals_each_conversation_alone(models, lengths):
    ours, _ = models
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    labels = torch.cat([conversation_labels(part) for part in ids.split(lengths, dim=1)], dim=1)
    with torch.no_grad():
        packed = ours(ids, position_ids=positions(lengths)).logits
        for part, part_labels, logits in zip(
            ids.split(lengths, dim=1), labels.split(lengths, dim=1), packed.split(lengths, dim=1)
        ):
            alone = ours(part).logits
            torch.testing.assert_close(logits, alone, rtol=0, atol=PACKED_ATOL)
            # per-conversation losses: the packed row's slice scored alone is the conversation's loss
            got, expected = causal_lm_loss_sum(logits, part_labels), causal_lm_loss_sum(alone, part_labels)
            torch.testing.assert_close(got, expected, rtol=SUM_RTOL, atol=0)
        # and the row's summed loss is the sum of the conversations' (the first label of each is -100, so no
        # conversation is trained to predict the next one's first token)
        total, count = causal_lm_loss_sum(packed, labels)
        separate = [causal_lm_loss_sum(ours(p).logits, q) for p, q in zip(ids.split(lengths, 1), labels.split(lengths, 1))]
        torch.testing.assert_close(total, sum(s for s, _ in separate), rtol=SUM_RTOL, atol=0)
        assert count == sum(c for _, c in separate)


@pytest.mark.parametrize("batch", [1, 3])
def test_packed_forward_equals_transformers_packed_forward(models, batch):
    ours, theirs = models
    lengths = [4, 11, 2, 8]
    ids = torch.randint(0, VOCAB, (batch, sum(lengths)))
    pos = positions(lengths).expand(batch, -1)
    with torch.no_grad():
        a = ours(ids, position_ids=pos).logits
        # use_cache=False: with a cache (config.use_cache is True by default, in train mode too) transformers
        # 5.24 skips packed-sequence detection and lets attention cross from one conversation into the next
        b = theirs(ids, position_ids=pos, use_cache=False).logits
    assert torch.equal(a, b)  # bit-identical: the same mask, the same SDPA call


def test_packed_gradients_match_transformers(models):
    ours, theirs = models
    ours.train(), theirs.train()
    try:
        lengths = [6, 10, 5]
        ids = torch.randint(0, VOCAB, (2, sum(lengths)))
        labels = torch.cat([conversation_labels(part) for part in ids.split(lengths, dim=1)], dim=1)
        pos = positions(lengths).expand(2, -1)
        total, count = causal_lm_loss_sum(ours(ids, position_ids=pos).logits, labels)
        la = total / count
        lb = theirs(ids, position_ids=pos, labels=labels, use_cache=False).loss
        torch.testing.assert_close(la, lb, rtol=0, atol=0)  # bit for bit, as the forward
        la.backward(), lb.backward()
        grads = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0, msg=name)
    finally:
        ours.eval(), theirs.eval()
        ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)


def test_sft_loss_is_transformers_loss(models):
    """Labels are aligned with input_ids and shifted inside: logits[t] is scored against labels[t + 1],
    as transformers' ForCausalLMLoss does. sum / count is transformers' mean, bit for bit."""
    ours, theirs = models
    ids = torch.randint(0, VOCAB, (3, 21))
    labels = conversation_labels(ids, trained=0.4)
    with torch.no_grad():
        logits = ours(ids).logits
        expected = theirs(ids, labels=labels).loss
    total, count = causal_lm_loss_sum(logits, labels)
    assert count == (labels[:, 1:] != IGNORE_INDEX).sum()  # the first label of a row is never scored
    assert torch.equal(total / count, expected)
    assert torch.equal(causal_lm_loss(logits, labels), expected)
    # the shift, written out: position t predicts labels[t + 1]
    log_probs = logits.double().log_softmax(-1)
    picked = [-log_probs[b, t, labels[b, t + 1]] for b in range(3) for t in range(20) if labels[b, t + 1] != IGNORE_INDEX]
    # the float32 sum against float64: measured 1.9e-8 relative, under one float32 ulp (the default rtol 1e-7)
    torch.testing.assert_close(total.double(), torch.stack(picked).sum(), rtol=1e-7, atol=0)


def test_attention_mask_or_cache_turns_packing_off_as_in_transformers(models):
    """Packing is read from position ids only when there is no attention mask and no cache, as transformers
    does; a padding mask with restarting positions is not a packed row (only RoPE restarts)."""
    ours, theirs = models
    lengths = [7, 6]
    ids = torch.randint(0, VOCAB, (1, 13))
    pos, ones = positions(lengths), torch.ones(1, 13, dtype=torch.long)
    with torch.no_grad():
        a = ours(ids, attention_mask=ones, position_ids=pos).logits
        b = theirs(ids, attention_mask=ones, position_ids=pos, use_cache=False).logits
        packed = ours(ids, position_ids=pos).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # both drop the all-ones mask: the same SDPA call
    assert not torch.allclose(a[:, 7:], packed[:, 7:])


@given(
    cuts=st.lists(st.integers(1, 31), max_size=5, unique=True),
    seed=st.integers(0, 2**16),
)
def test_random_splits_of_a_row_change_nothing(models, cuts, seed):
    ours, _ = models
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, 32), generator=generator)
    bounds = [0, *sorted(cuts), 32]
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    with torch.no_grad():
        packed = ours(ids, position_ids=positions(lengths)).logits
        for part, logits in zip(ids.split(lengths, dim=1), packed.split(lengths, dim=1)):
            torch.testing.assert_close(logits, ours(part).logits, rtol=0, atol=PACKED_ATOL)


# pack(): rows of a fixed length

PAD = 0


def segments(row) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The row split where its position ids restart: (input_ids, labels) of each conversation and the padding."""
    starts = [k for k, p in enumerate(row.position_ids) if p == 0] + [len(row.position_ids)]
    out = []
    for a, b in zip(starts, starts[1:]):
        assert row.position_ids[a:b] == list(range(b - a))  # positions restart at 0 and count up
        out.append((tuple(row.input_ids[a:b]), tuple(row.labels[a:b])))
    return out


@st.composite
def examples(draw):
    out = []
    for _ in range(draw(st.integers(0, 12))):
        n = draw(st.integers(1, 20))
        ids = draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
        trained = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        out.append((ids, [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]))
    return out


@given(examples(), st.integers(1, 24), st.sampled_from(["truncate", "drop"]))
def test_pack_loses_and_duplicates_no_label(examples, seq_len, too_long):
    result = pack(examples, seq_len, pad_id=PAD, too_long=too_long)
    expected, truncated, dropped = [], 0, 0
    for ids, labels in examples:
        if len(ids) > seq_len:
            if too_long == "drop":
                dropped += 1
                continue
            ids, labels, truncated = ids[:seq_len], labels[:seq_len], truncated + 1
        labels = [IGNORE_INDEX, *labels[1:]]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
        else:
            expected.append((tuple(ids), tuple(labels)))
    assert (result.truncated, result.dropped) == (truncated, dropped)

    found = []
    for row in result.rows:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) == seq_len
        parts = segments(row)
        pad = seq_len - sum(len(ids) for ids, labels in parts if any(label != IGNORE_INDEX for label in labels))
        if pad:  # the tail is padding, a segment of its own, never trained
            assert parts[-1] == ((PAD,) * pad, (IGNORE_INDEX,) * pad)
            parts = parts[:-1]
        found.extend(parts)
    assert sorted(found) == sorted(expected)  # every kept conversation once, whole, its labels with it


def test_pack_fills_rows_first_fit_and_counts():
    examples = [([5] * n, [5] * n) for n in (6, 3, 5, 2, 9, 4)]
    result = pack(examples, seq_len=10, pad_id=PAD)
    assert [[len(ids) for ids, _ in segments(row)] for row in result.rows] == [[6, 3, 1], [5, 2, 3], [9, 1], [4, 6]]
    assert (result.truncated, result.dropped) == (0, 0)
    assert result.rows[0].position_ids == [0, 1, 2, 3, 4, 5, 0, 1, 2, 0]
    assert result.rows[0].labels[:7] == [IGNORE_INDEX, 5, 5, 5, 5, 5, IGNORE_INDEX]  # each conversation's first

    long = [([7] * 12, [7] * 12), ([8] * 3, [IGNORE_INDEX] * 3)]
    cut = pack(long, seq_len=10, pad_id=PAD)
    assert (cut.truncated, cut.dropped, len(cut.rows)) == (1, 1, 1)
    assert cut.rows[0].input_ids == [7] * 10
    kept = pack(long, seq_len=10, pad_id=PAD, too_long="drop")
    assert (kept.truncated, kept.dropped, kept.rows) == (0, 2, [])


@pytest.mark.parametrize("kwargs, words", [({"seq_len": 0}, "seq_len"), ({"seq_len": 4, "too_long": "wrap"}, "too_long")])
def test_pack_refuses_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        pack([], pad_id=PAD, **kwargs)


def test_packed_rows_through_the_model_give_each_conversation_its_loss(models):
    """pack() + position ids into the model: the same per-conversation loss sums as running each alone."""
    ours, _ = models
    torch.manual_seed(1)
    conversations = []
    for n in (9, 4, 13, 6, 3):
        ids = torch.randint(1, VOCAB, (n,))
        conversations.append((ids.tolist(), conversation_labels(ids).tolist()))
    result = pack(conversations, seq_len=16, pad_id=PAD)
    ids, labels, pos = (torch.tensor([getattr(r, f) for r in result.rows]) for f in ("input_ids", "labels", "position_ids"))
    with torch.no_grad():
        total, count = causal_lm_loss_sum(ours(ids, position_ids=pos).logits, labels)
        alone = [causal_lm_loss_sum(ours(torch.tensor([i])).logits, torch.tensor([q])) for i, q in conversations]
    torch.testing.assert_close(total, sum(s for s, _ in alone), rtol=SUM_RTOL, atol=0)
    assert count == sum(c for _, c in alone)
