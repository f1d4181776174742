"""The comparison engine: run smollm_ref and transformers on the same input, capture every module output
that has a counterpart with forward hooks, and measure how far apart each pair is.

Both models use transformers' module names, so one list of module paths addresses both: the embedding;
per decoder layer its input norm, attention output, post-attention norm, MLP output and layer output; the
final norm; the logits (`lm_head`); and the loss, taken from the forward's output. Captured tensors are
copied to the CPU; `compare_models` streams the second model's outputs against the first's and drops each
reference as soon as it is used, so a 4096-token float32 pass holds one model's activations, not two.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from smollm_ref import precision

# Per decoder layer: (submodule, what its output is), in the order the forward pass produces them.
LAYER_POINTS = (
    ("input_layernorm", "input norm"),
    ("self_attn", "attention output"),
    ("post_attention_layernorm", "post-attention norm"),
    ("mlp", "MLP output"),
    ("", "layer output"),
)
LOSS = "loss"

# torch.testing.assert_close defaults for float32.
FLOAT32_RTOL, FLOAT32_ATOL = 1.3e-6, 1e-5

_CHUNK = 1 << 22  # elements per step when reducing, to bound float64 temporaries at 32 MiB


def capture_points(num_layers: int) -> list[str]:
    """Module paths (relative to the causal LM) whose outputs are compared, in forward order; then `loss`."""
    points = ["model.embed_tokens"]
    for i in range(num_layers):
        points += [f"model.layers.{i}.{sub}" if sub else f"model.layers.{i}" for sub, _ in LAYER_POINTS]
    return points + ["model.norm", "lm_head", LOSS]


def describe(point: str) -> str:
    """Human name of a capture point: 'layer 3 attention output', 'logits', ..."""
    fixed = {"model.embed_tokens": "embeddings", "model.norm": "final norm", "lm_head": "logits", LOSS: "loss"}
    if point in fixed:
        return fixed[point]
    m = re.fullmatch(r"model\.layers\.(\d+)(?:\.(\w+))?", point)
    if m:
        sub = m.group(2) or ""
        return f"layer {m.group(1)} " + dict(LAYER_POINTS).get(sub, sub)
    return point


def layer_of(name: str) -> int | None:
    """Decoder layer index a point or parameter name belongs to, or None."""
    m = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Diff:
    """How one tensor of the model under test (`a`) differs from the reference's (`b`)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # of a
    identical: bool  # same dtype-independent values, bit for bit
    max_abs: float  # max |a - b|
    max_rel: float  # max |a - b| / |b| over elements with b != 0 (inf where b == 0 != a)
    rel_l2: float  # ||a - b|| / ||b||: the error relative to the tensor's own size
    cosine: float  # <a, b> / (||a|| ||b||)
    ref_max: float  # max |b|, the scale the differences are measured against
    close: bool  # every element within torch.testing.assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5)

    @property
    def description(self) -> str:
        return describe(self.name)

    def summary(self) -> str:
        return (
            f"{self.name} ({self.description}): max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, "
            f"rel L2 {self.rel_l2:.3g}, cosine {self.cosine:.9f}"
        )

    def to_json(self) -> dict:
        out = asdict(self)
        out["shape"] = list(self.shape)
        for k, v in out.items():
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = str(v)  # JSON has no inf/nan
        return out


def diff(name: str, a: torch.Tensor, b: torch.Tensor) -> Diff:
    """Measure `a` against the reference `b` (same shape; any float dtypes), in float64, chunk by chunk."""
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(a.shape)} vs reference {tuple(b.shape)}")
    a, b = a.detach(), b.detach()
    if a.dtype == b.dtype and torch.equal(a, b):  # the common case, one pass instead of the full reduction below
        ref_max = b.abs().max().item() if b.numel() else 0.0
        return Diff(name, tuple(a.shape), str(a.dtype).removeprefix("torch."), True, 0.0, 0.0, 0.0, 1.0, ref_max, True)
    a_flat, b_flat = a.reshape(-1), b.reshape(-1)
    work = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    identical, close = True, True
    max_abs = max_rel = ref_max = 0.0
    sq_err = sq_a = sq_b = dot = 0.0
    for start in range(0, a_flat.numel(), _CHUNK):
        # Elementwise work in float32 (exact for the differences that matter here); sums in float64.
        x = a_flat[start : start + _CHUNK].to(device="cpu", dtype=work)
        y = b_flat[start : start + _CHUNK].to(device="cpu", dtype=work)
        d = x - y
        nan = d.isnan()
        if nan.any():  # NaN on either side (or inf - inf) is a difference, as in torch.equal
            identical = close = False
            x, y, d = x[~nan], y[~nan], d[~nan]
            max_abs = max_rel = math.inf
        err, ay = d.abs(), y.abs()
        if err.numel() == 0:
            continue
        identical &= not bool(err.any())
        close &= bool((err <= FLOAT32_ATOL + FLOAT32_RTOL * ay).all())
        max_abs = max(max_abs, err.max().item())
        rel = (err / ay).nan_to_num(nan=0.0, posinf=math.inf)  # 0/0 -> 0; x/0 -> inf
        max_rel = max(max_rel, rel.max().item())
        ref_max = max(ref_max, ay.max().item())
        sq_err += err.square().sum(dtype=torch.float64).item()
        sq_a += x.square().sum(dtype=torch.float64).item()
        sq_b += y.square().sum(dtype=torch.float64).item()
        dot += (x * y).sum(dtype=torch.float64).item()
    rel_l2 = math.sqrt(sq_err / sq_b) if sq_b > 0 else (0.0 if sq_err == 0 else math.inf)
    cosine = dot / math.sqrt(sq_a * sq_b) if sq_a > 0 and sq_b > 0 else (1.0 if sq_a == sq_b == 0 else 0.0)
    return Diff(
        name, tuple(a.shape), str(a.dtype).removeprefix("torch."), identical, max_abs, max_rel, rel_l2, cosine, ref_max, close
    )


@contextlib.contextmanager
def hooks(model: torch.nn.Module, points: list[str], sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Forward hooks on the modules at `points` (module paths) that pass each output, detached and copied to
    the CPU, to `sink(point, tensor)`. Attention modules return (output, weights) in transformers: the
    first element is the output."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for point in points:
            if point == LOSS:
                continue
            if point not in modules:
                raise KeyError(f"{type(model).__name__} has no module {point!r} to capture")

            def hook(module, args, output, point=point):
                t = output[0] if isinstance(output, (tuple, list)) else output
                sink(point, t.detach().to("cpu", copy=True))

            handles.append(modules[point].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def run(
    model: torch.nn.Module,
    points: list[str],
    sink: Callable[[str, torch.Tensor], None],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    autocast: torch.dtype | None = None,
    position_ids: torch.Tensor | None = None,
) -> None:
    """One no-grad forward of either model with labels = input_ids (-100 at padding), every point's output
    sent to `sink` (the loss last). Both models take (input_ids, attention_mask=, position_ids=, labels=)
    and return .logits/.loss."""
    with torch.no_grad(), hooks(model, points, sink), precision.autocast(_device(model).type, autocast):
        out = model(**_inputs(model, input_ids, attention_mask, position_ids))
    if LOSS in points:
        sink(LOSS, out.loss.detach().to("cpu", copy=True))


def _inputs(model, input_ids, attention_mask, position_ids) -> dict:
    device = _device(model)
    input_ids = input_ids.to(device)
    mask = attention_mask.to(device) if attention_mask is not None else None
    labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, -100)
    # Explicit positions matter with padding: transformers' forward numbers tokens 0..T-1 whatever the mask
    # says, smollm_ref counts from each row's first real token (as `generate` does in both libraries).
    positions = position_ids.to(device) if position_ids is not None else None
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "labels": labels}


def capture(model, points, input_ids, attention_mask=None, autocast=None, position_ids=None) -> dict[str, torch.Tensor]:
    """Every point's output of one forward, in forward order (a point hit twice is an error)."""
    out: dict[str, torch.Tensor] = {}

    def sink(point, t):
        if point in out:
            raise RuntimeError(f"{point} produced two outputs in one forward; it cannot be compared one to one")
        out[point] = t

    run(model, points, sink, input_ids, attention_mask, autocast, position_ids)
    _check_complete(out.keys(), points, model)
    return out


def _check_complete(got, points, model) -> None:
    missing = [p for p in points if p not in got]
    if missing:
        raise RuntimeError(f"{type(model).__name__} never produced {missing[:3]}{' ...' if len(missing) > 3 else ''}")


def compare(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[Diff]:
    """Diffs of two captures, in the order of `ours` (which must hold exactly the reference's points)."""
    if set(ours) != set(reference):
        raise ValueError(f"captures differ in points: {sorted(set(ours) ^ set(reference))[:5]}")
    return [diff(name, ours[name], reference[name]) for name in ours]


def compare_models(
    ours: torch.nn.Module,
    reference: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    autocast: torch.dtype | None = None,
    position_ids: torch.Tensor | None = None,
    points: list[str] | None = None,
) -> list[Diff]:
    """Run the reference, then ours, on the same input; diff every point as ours produces it (each reference
    tensor is freed once used). Returns the diffs in forward order."""
    points = points or capture_points(len(ours.model.layers))
    ref = capture(reference, points, input_ids, attention_mask, autocast, position_ids)
    diffs: list[Diff] = []
    seen: set[str] = set()

    def sink(point, t):
        if point in seen:
            raise RuntimeError(f"{point} produced two outputs in one forward; it cannot be compared one to one")
        seen.add(point)
        diffs.append(diff(point, t, ref.pop(point)))

    run(ours, points, sink, input_ids, attention_mask, autocast, position_ids)
    _check_complete(seen, points, ours)
    return diffs


def gradients(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask=None, position_ids=None) -> dict[str, torch.Tensor]:
    """Loss and every parameter's gradient after one float32 forward + backward with labels = input_ids.
    Keys: 'loss' and parameter names (a tied weight appears once, under its first name)."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = model(**_inputs(model, input_ids, attention_mask, position_ids))
        out.loss.backward()
    grads = {LOSS: out.loss.detach().to("cpu", copy=True)}
    for name, p in model.named_parameters():
        if p.grad is None:
            raise RuntimeError(f"{type(model).__name__}.{name} received no gradient")
        grads[name] = p.grad.detach().to("cpu", copy=True)
    model.zero_grad(set_to_none=True)
    return grads


def first_failure(diffs: list[Diff], criterion: str = "close") -> Diff | None:
    """The first diff (forward order) that is not `identical` or not `close`."""
    if criterion not in ("identical", "close"):
        raise ValueError(f"criterion must be 'identical' or 'close', got {criterion!r}")
    return next((d for d in diffs if not getattr(d, criterion)), None)


@dataclass(frozen=True)
class BoundCheck:
    """One point of the low-precision check: ours' and transformers' errors against transformers-float32."""

    name: str
    ours: float  # rel L2 error of smollm_ref (low precision) against transformers float32
    theirs: float  # rel L2 error of transformers (same low precision) against transformers float32
    ours_max_abs: float
    theirs_max_abs: float
    factor: float

    @property
    def ratio(self) -> float:
        if self.theirs == 0:
            return 1.0 if self.ours == 0 else math.inf
        return self.ours / self.theirs

    @property
    def ok(self) -> bool:
        return self.ours <= self.factor * self.theirs

    @property
    def description(self) -> str:
        return describe(self.name)


def bound_checks(ours: list[Diff], theirs: list[Diff], factor: float) -> list[BoundCheck]:
    """Pair the two error profiles point by point. The bound is on rel L2 (the norm-wise relative error,
    the standard measure of a computation's forward error): a max over one element is dominated by a single
    unlucky rounding and would make a 1.25x bound a coin toss."""
    by_name = {d.name: d for d in theirs}
    if set(by_name) != {d.name for d in ours}:
        raise ValueError("the two error profiles cover different points")
    return [BoundCheck(d.name, d.rel_l2, by_name[d.name].rel_l2, d.max_abs, by_name[d.name].max_abs, factor) for d in ours]


@dataclass(frozen=True)
class ArgmaxCheck:
    """Next-token agreement at positions where transformers-float32's choice is clear.

    A position is *clear* when the reference's top-2 logit margin exceeds 2 x factor x eps, eps being the
    largest logit error transformers' own low-precision run makes at that position. A model whose logits
    are each within factor x eps of the reference cannot swap the top two (that needs one logit up and the
    other down by margin/2 together), so at clear positions a different argmax is a real error, not noise."""

    positions: int
    clear: int
    agree_clear: int
    agree_all: int
    theirs_agree_all: int
    first_disagreement: int | None  # position index of the first clear disagreement


def argmax_check(ref: torch.Tensor, theirs_low: torch.Tensor, ours_low: torch.Tensor, factor: float) -> ArgmaxCheck:
    """ref/theirs_low/ours_low: (B, T, V) logits of transformers-float32, transformers-low and ours-low."""
    ref = ref.float().reshape(-1, ref.shape[-1])
    theirs_low = theirs_low.float().reshape(ref.shape)
    ours_low = ours_low.float().reshape(ref.shape)
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    eps = (theirs_low - ref).abs().amax(dim=-1)
    clear = margin > 2 * factor * eps
    want = ref.argmax(-1)
    ours_agree = ours_low.argmax(-1) == want
    bad = (clear & ~ours_agree).nonzero()
    return ArgmaxCheck(
        positions=ref.shape[0],
        clear=int(clear.sum()),
        agree_clear=int((clear & ours_agree).sum()),
        agree_all=int(ours_agree.sum()),
        theirs_agree_all=int((theirs_low.argmax(-1) == want).sum()),
        first_disagreement=int(bad[0, 0]) if len(bad) else None,
    )
