"""The parity report: per-layer tables in the terminal, and the same as Markdown and JSON files.

Each check adds one section. A forward or gradient comparison is shown one row per decoder layer (its five
captured outputs, or its parameters, folded into the row) between the embedding and the logits, so the eye
finds the first row that is not bit-identical and sees the error grow down the column.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .engine import LOSS, ArgmaxCheck, BoundCheck, Diff, describe, first_failure, layer_of

BAR_WIDTH = 12


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2e}"


def bar(err: float) -> str:
    """Error magnitude on a log scale: one block per decade above 1e-9 (0 shows as nothing)."""
    if err <= 0 or math.isnan(err):
        return ""
    return "#" * max(1, min(BAR_WIDTH, math.floor(math.log10(err)) + 10)) if math.isfinite(err) else "#" * BAR_WIDTH


def _table_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _table_md(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|") or " "  # noqa: E731
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows])


def _heading(title: str, info: dict) -> str:
    return f"{title} ({', '.join(f'{k} {v}' for k, v in info.items())})" if info else title


def _short(name: str) -> str:
    """The part of a point or parameter name below its layer: 'self_attn', 'mlp.up_proj.weight', 'output'."""
    if layer_of(name) is None:
        return name
    rest = name.split(f"layers.{layer_of(name)}", 1)[1].lstrip(".")
    return rest or "output"


def _fold_identical_layers(groups: list[tuple[str, list[Diff]]]) -> list[tuple[str, list[Diff]]]:
    """Consecutive layers whose every tensor is bit-identical become one row, 'layers 0-29': the rows left
    are the ones worth reading."""
    out: list[tuple[str, list[Diff]]] = []
    run: list[tuple[str, list[Diff]]] = []

    def flush():
        if len(run) > 1:
            first, last = run[0][0].split()[-1], run[-1][0].split()[-1]
            out.append((f"layers {first}-{last}", [d for _, g in run for d in g]))
        else:
            out.extend(run)
        run.clear()

    for label, group in groups:
        if label.startswith("layer ") and all(d.identical for d in group):
            run.append((label, group))
        else:
            flush()
            out.append((label, group))
    flush()
    return out


def layer_rows(diffs: list[Diff]) -> tuple[list[str], list[list[str]]]:
    """One row per decoder layer (and per point outside the layers), in forward order; runs of wholly
    bit-identical layers folded into one row."""
    groups: list[tuple[str, list[Diff]]] = []
    for d in diffs:
        layer = layer_of(d.name)
        label = f"layer {layer}" if layer is not None else describe(d.name) if d.name != LOSS else "loss"
        if groups and groups[-1][0] == label:
            groups[-1][1].append(d)
        else:
            groups.append((label, [d]))
    groups = _fold_identical_layers(groups)
    header = ["where", "bit-identical", "max abs diff", "worst at", "max rel diff", "rel L2", "min cosine", "log10 error"]
    rows = []
    for label, group in groups:
        worst = max(group, key=lambda d: d.max_abs)
        last = group[-1]  # the layer output (forward) or the last parameter
        rows.append(
            [
                label,
                f"{sum(d.identical for d in group)}/{len(group)}",
                fmt(worst.max_abs),
                _short(worst.name) if worst.max_abs > 0 and len(group) > 1 else "",
                fmt(max(d.max_rel for d in group)),
                fmt(
                    last.rel_l2
                    if len(group) > 1 and layer_of(last.name) is not None and _short(last.name) == "output"
                    else worst.rel_l2
                ),
                f"{min(d.cosine for d in group):.9f}",
                bar(worst.max_abs),
            ]
        )
    return header, rows


def point_rows(diffs: list[Diff]) -> tuple[list[str], list[list[str]]]:
    header = ["point", "shape", "dtype", "identical", "close", "max abs diff", "max rel diff", "rel L2", "cosine", "max abs ref"]
    rows = [
        [d.name, "x".join(map(str, d.shape)) or "scalar", d.dtype, "yes" if d.identical else "no", "yes" if d.close else "no",
         fmt(d.max_abs), fmt(d.max_rel), fmt(d.rel_l2), f"{d.cosine:.9f}", fmt(d.ref_max)]
        for d in diffs
    ]  # fmt: skip
    return header, rows


@dataclass
class DiffSection:
    """A forward-pass or gradient comparison. `expect` is what the check asserts: 'identical' or 'close'."""

    title: str
    diffs: list[Diff]
    expect: str
    info: dict = field(default_factory=dict)

    @property
    def identical(self) -> int:
        return sum(d.identical for d in self.diffs)

    @property
    def first_divergence(self) -> Diff | None:
        return first_failure(self.diffs, "identical")

    @property
    def first_failure(self) -> Diff | None:
        return first_failure(self.diffs, self.expect)

    @property
    def ok(self) -> bool:
        return self.first_failure is None

    def verdict(self) -> str:
        n = len(self.diffs)
        head = f"{'PASS' if self.ok else 'FAIL'}: {self.identical}/{n} tensors bit-identical, {sum(d.close for d in self.diffs)}/{n} within float32 assert_close"
        asserted = "bit-identity" if self.expect == "identical" else "float32 assert_close"
        first, failing = self.first_divergence, self.first_failure
        where = f"; first divergence: {first.summary()}" if first else "; no divergence anywhere"
        if failing is not None and failing is not first:
            where += f"; first beyond float32 assert_close: {failing.summary()}"
        return head + where + f" (asserted: {asserted})"

    def text(self) -> str:
        return f"== {_heading(self.title, self.info)}\n{self.verdict()}\n{_table_text(*layer_rows(self.diffs))}"

    def markdown(self) -> str:
        info = "\n".join(f"- {k}: {v}" for k, v in self.info.items())
        return (
            f"## {self.title}\n\n{info}\n\n**{self.verdict()}**\n\n{_table_md(*layer_rows(self.diffs))}\n\n"
            f"<details><summary>every captured tensor ({len(self.diffs)})</summary>\n\n{_table_md(*point_rows(self.diffs))}\n\n</details>"
        )

    def to_json(self) -> dict:
        return {"kind": "diff", "title": self.title, "expect": self.expect, "ok": self.ok, "info": self.info,
                "first_divergence": self.first_divergence.name if self.first_divergence else None,
                "diffs": [d.to_json() for d in self.diffs]}  # fmt: skip


@dataclass
class BoundSection:
    """The low-precision check: ours' error vs transformers-float32 within factor x transformers' own."""

    title: str
    checks: list[BoundCheck]
    argmax: ArgmaxCheck
    info: dict = field(default_factory=dict)

    @property
    def first_failure(self) -> BoundCheck | None:
        return next((c for c in self.checks if not c.ok), None)

    @property
    def argmax_ok(self) -> bool:
        return self.argmax.agree_clear == self.argmax.clear

    @property
    def ok(self) -> bool:
        return self.first_failure is None and self.argmax_ok

    def verdict(self) -> str:
        bad, a = self.first_failure, self.argmax
        factor = self.checks[0].factor if self.checks else float("nan")
        head = f"{'PASS' if self.ok else 'FAIL'}: {sum(c.ok for c in self.checks)}/{len(self.checks)} tensors with rel L2 error <= {factor}x transformers'"
        head += f" (worst ratio {max((c.ratio for c in self.checks), default=0):.3f})"
        if bad:
            head += f"; first over the bound: {bad.name} ({bad.description}) ratio {bad.ratio:.3f}"
        head += (
            f"; next-token argmax agrees at {a.agree_clear}/{a.clear} clear positions "
            f"({a.agree_all}/{a.positions} overall; transformers' own low precision: {a.theirs_agree_all}/{a.positions})"
        )
        return head

    def rows(self) -> tuple[list[str], list[list[str]]]:
        header = [
            "where",
            "ours rel L2",
            "transformers rel L2",
            "ratio",
            "worst ratio at",
            "ours max abs",
            "transformers max abs",
            "log10 error",
        ]
        groups: list[tuple[str, list[BoundCheck]]] = []
        for c in self.checks:
            layer = layer_of(c.name)
            label = f"layer {layer}" if layer is not None else c.description
            if groups and groups[-1][0] == label:
                groups[-1][1].append(c)
            else:
                groups.append((label, [c]))
        rows = []
        for label, group in groups:
            worst = max(group, key=lambda c: c.ratio)
            last = group[-1]
            at = _short(worst.name) if len(group) > 1 and any(c.ratio != worst.ratio for c in group) else ""
            rows.append([label, fmt(last.ours), fmt(last.theirs), f"{worst.ratio:.3f}", at,
                         fmt(max(c.ours_max_abs for c in group)), fmt(max(c.theirs_max_abs for c in group)),
                         bar(max(c.theirs_max_abs for c in group))])  # fmt: skip
        return header, rows

    def text(self) -> str:
        return f"== {_heading(self.title, self.info)}\n{self.verdict()}\n{_table_text(*self.rows())}"

    def markdown(self) -> str:
        info = "\n".join(f"- {k}: {v}" for k, v in self.info.items())
        note = (
            "Per layer, the rel L2 errors are those of the layer output; the ratio is the worst over the layer's five "
            "captured tensors. A position is *clear* when transformers-float32's top-2 logit margin exceeds "
            f"2 x {self.checks[0].factor if self.checks else '?'} x the largest logit error transformers' own "
            "low-precision run makes there: no model within that error of the reference can swap the top two."
        )
        return f"## {self.title}\n\n{info}\n\n**{self.verdict()}**\n\n{note}\n\n{_table_md(*self.rows())}"

    def to_json(self) -> dict:
        return {"kind": "bound", "title": self.title, "ok": self.ok, "info": self.info, "argmax": asdict(self.argmax),
                "checks": [asdict(c) | {"ratio": c.ratio if math.isfinite(c.ratio) else str(c.ratio)} for c in self.checks]}  # fmt: skip


@dataclass
class TableSection:
    """Anything else worth a table (generation matches, training losses): rows added one by one, each
    with its own pass/fail."""

    title: str
    header: list[str]
    info: dict = field(default_factory=dict)
    rows: list[list[str]] = field(default_factory=list)
    oks: list[bool] = field(default_factory=list)

    def add_row(self, row: list, ok: bool) -> None:
        self.rows.append([str(c) for c in row])
        self.oks.append(bool(ok))

    @property
    def ok(self) -> bool:
        return all(self.oks)

    def verdict(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}: {sum(self.oks)}/{len(self.oks)} rows match"

    def text(self) -> str:
        return f"== {self.title}\n{self.verdict()}\n{_table_text(self.header, self.rows)}"

    def markdown(self) -> str:
        info = "\n".join(f"- {k}: {v}" for k, v in self.info.items())
        return f"## {self.title}\n\n{info}\n\n**{self.verdict()}**\n\n{_table_md(self.header, self.rows)}"

    def to_json(self) -> dict:
        return {"kind": "table", "title": self.title, "ok": self.ok, "info": self.info, "header": self.header, "rows": self.rows}


@dataclass
class Report:
    """All sections of one run, with the run's context (model source, versions)."""

    context: dict
    sections: list = field(default_factory=list)

    def add(self, section) -> None:
        self.sections.append(section)

    def table(self, title: str, header: list[str], info: dict | None = None) -> TableSection:
        """The table section called `title`, created (with `header`) on first use."""
        for s in self.sections:
            if isinstance(s, TableSection) and s.title == title:
                return s
        section = TableSection(title, header, info or {})
        self.add(section)
        return section

    def text(self) -> str:
        head = "smollm_ref vs transformers, layer by layer: " + ", ".join(f"{k} {v}" for k, v in self.context.items())
        return "\n\n".join([head, *(s.text() for s in self.sections)])

    def markdown(self) -> str:
        ok = sum(s.ok for s in self.sections)
        context = "\n".join(f"- {k}: {v}" for k, v in self.context.items())
        index = "\n".join(f"| {s.title} | {'PASS' if s.ok else '**FAIL**'} |" for s in self.sections)
        return (
            "# Parity report: smollm_ref vs transformers\n\n"
            "Each section runs both models on the same input and compares every module output that has a counterpart "
            "(embeddings; per layer the input norm, attention output, post-attention norm, MLP output and layer output; "
            "the final norm; the logits; the loss), or every gradient. *rel L2* is ||ours - transformers|| / ||transformers||; "
            "*log10 error* draws one # per decade of the max abs difference above 1e-9.\n\n"
            f"{context}\n\n**{ok}/{len(self.sections)} checks pass.**\n\n| check | result |\n|---|---|\n{index}\n\n"
            + "\n\n".join(s.markdown() for s in self.sections)
            + "\n"
        )

    def to_json(self) -> dict:
        return {"context": self.context, "sections": [s.to_json() for s in self.sections]}

    def write(self, directory: str | Path, stem: str = "parity") -> list[Path]:
        """Write `<stem>.md` and `<stem>.json` into `directory` (created); returns the two paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        md, js = directory / f"{stem}.md", directory / f"{stem}.json"
        md.write_text(self.markdown())
        data = self.to_json() | {"written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        js.write_text(json.dumps(data, indent=1) + "\n")
        return [md, js]
