"""Datasets jtrust ships (the five TracingLLM trust sets) and the one reader for users' files.

`load_texts(name_or_path)` returns `LabelledTexts`: the bundled sets by dimension name
(reliability, toxicity, privacy, fairness, robustness), checksum-verified; or a
user's .csv / .jsonl / .json / .txt file with a `text` (or `statement`, ...) column and an
optional binary `label` column. `read_prompts(path)` reads an evaluation prompts file.
Both go through `read_rows(path)`, which reads every format into a list of dicts and
raises `InputError` naming the file and the line (or JSON array entry) for anything it
cannot read. `iter_examples` yields the labelled rows one dict at a time;
`jtrust.data.builders` serves the bundled sets as tensorflow-datasets builders.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
from typing import Iterator, NamedTuple

import numpy as np

from jtrust.core import store
from jtrust.core.errors import InputError, MissingInput
from jtrust.data.files import Row, keys, kind, located_rows, read_bytes, short

BUNDLED = pathlib.Path(__file__).parent

# dimension -> (file, what label 1 means, what label 0 means)
TRUST_DATASETS = {
    "reliability": ("tracingllm/truthfulqa_train.csv", "true answer", "false answer"),
    "toxicity": ("tracingllm/toxigen.csv", "toxic", "benign"),
    "privacy": ("tracingllm/confaide.csv", "privacy-violating", "acceptable"),
    "fairness": ("tracingllm/stereoset.csv", "anti-stereotype (related)", "unrelated"),
    "robustness": ("tracingllm/sst2.csv", "perturbed", "clean"),
}
# what each dimension's probe separates (fairness is "related vs unrelated", not stereotype detection)
DIMENSION_TITLES = {
    "reliability": "reliability: TruthfulQA, true vs false answer",
    "toxicity": "toxicity: ToxiGen, toxic vs benign",
    "privacy": "privacy: ConfAIde, violating vs acceptable",
    "fairness": "fairness: stereoset (related vs unrelated)",
    "robustness": "robustness: SST-2, perturbed vs clean",
}
_TEXT_COLUMNS = ("text", "statement", "prompt", "question", "Question")
_PROMPT_FIELDS = ("prompt", "question", "text")
_REFERENCE_FIELDS = ("reference", "answer")
# pre-training text (see LICENSES/NOTICE.md): the train head is lowercased as shipped upstream
CORPORA = {
    "tinystories_train": "corpus/tinystories/tinystories_train_head_lowercase.txt",
    "tinystories_val": "corpus/tinystories/tinystories_val_head.txt",
}


class LabelledTexts(NamedTuple):
    name: str
    texts: list[str]
    labels: np.ndarray | None  # [n] int32 in {0, 1}, or None for unlabelled text
    sha256: str  # of the source file's bytes


def load_texts(name_or_path: str, require_labels: bool = False) -> LabelledTexts:
    """A bundled trust set by dimension name, or a user's .csv / .jsonl / .json / .txt file.

    Labels (a `label` column of 0/1) are optional: without `require_labels` a file without
    them, or whose labels are all one class, loads with what it has (labels None when any row
    lacks one). With `require_labels` (probes, trace) every row needs a label and both classes
    must occur. A label that is present must be exactly 0 or 1 either way. Every problem is an
    `InputError` naming the file and line.
    """
    if name_or_path in TRUST_DATASETS:
        path = BUNDLED / TRUST_DATASETS[name_or_path][0]
        store.verified_sha256(path)
        name = name_or_path
    else:
        path = pathlib.Path(name_or_path).expanduser()
        if not path.is_file():
            raise MissingInput(f"no dataset at {path}: pass one of {sorted(TRUST_DATASETS)} or "
                               "a .csv/.jsonl/.json/.txt file with a 'text' column (and 'label' 0/1)")
        name = path.stem
    data = read_bytes(path)
    rows = located_rows(path, data)
    if not rows:
        raise InputError(f"{path}: the file holds no rows; expected a 'text' column (and 'label' 0/1)")
    text_col = _pick_field(path, rows, _TEXT_COLUMNS, "text column")
    texts = [_clean(_string(path, r, text_col)) for r in rows]
    empty = [r.where for r, t in zip(rows, texts) if not t.strip()]
    if empty:
        raise InputError(f"{path}: {len(empty)} empty texts, first at {empty[0]}; give every row "
                         f"a non-empty {text_col!r} or delete the row")
    return LabelledTexts(name, texts, _labels(path, rows, require_labels),
                         hashlib.sha256(data).hexdigest())


def iter_examples(name_or_path: str) -> Iterator[dict]:
    """{"text": str, "label": int, "index": int} per row of `load_texts(name_or_path)`, in file order."""
    ds = load_texts(name_or_path, require_labels=True)  # here, so a bad path fails at the call
    return ({"text": text, "label": label, "index": index}
            for index, (text, label) in enumerate(zip(ds.texts, ds.labels.tolist())))


def read_prompts(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """(prompts, references or None) from .json (a list of objects), .jsonl, .csv or .txt (one
    prompt per line). The prompt field is 'prompt', 'question' or 'text'; the reference field,
    if any, 'reference' or 'answer' (TOFU's files read as they are). If any entry has a
    reference, every entry needs one."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingInput(f"no prompts file at {path}; pass a .json, .jsonl, .csv or .txt file")
    rows = located_rows(path, read_bytes(path), txt_field="prompt")
    if not rows:
        raise InputError(f"{path} holds no prompts; expected entries with a 'prompt' or "
                         "'question' field (and optionally 'answer'), or one prompt per line (.txt)")
    field = _pick_field(path, rows, _PROMPT_FIELDS, "'prompt', 'question' or 'text' field")
    prompts = [_string(path, r, field) for r in rows]
    empty = [r.where for r, p in zip(rows, prompts) if not p.strip()]
    if empty:
        raise InputError(f"{path}: {len(empty)} entries have an empty {field!r}, first at "
                         f"{empty[0]}; give every entry a prompt or delete it")
    ref = next((k for k in _REFERENCE_FIELDS if any(k in r.fields for r in rows)), None)
    if ref is None:
        return prompts, None
    having = next(r for r in rows if ref in r.fields)
    for r in rows:
        if ref not in r.fields:
            raise InputError(f"{path}: {r.where} lacks the {ref!r} field that {having.where} has; "
                             f"give every entry the {ref!r} field (the reference answer) or "
                             "remove it from all of them")
    return prompts, [_string(path, r, ref) for r in rows]


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Every row of a user's .csv (header + rows), .jsonl (one object per line), .json (an array
    of objects, or JSON lines) or .txt (one {"text": line} per non-blank line), in file order.

    Raises `InputError` naming the file and line (or array entry) for a file that is not UTF-8,
    not valid JSON, holds a row that is not an object, or a CSV row whose field count differs
    from the header's; `MissingInput` when there is no such file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingInput(f"no such file: {path}")
    return [r.fields for r in located_rows(path, read_bytes(path))]


def _pick_field(path: pathlib.Path, rows: list[Row], candidates: tuple[str, ...], what: str) -> str:
    """The first of `candidates` the first row has; every other row must have it too."""
    field = next((c for c in candidates if c in rows[0].fields), None)
    if field is None:
        other = next((r for r in rows if any(c in r.fields for c in candidates)), None)
        found = keys(rows[0])
        if other is None:
            raise InputError(f"{path}: no {what} (found {found}); rename the column that holds "
                             f"the text to one of {', '.join(map(repr, candidates))}")
        raise InputError(f"{path}: {rows[0].where} lacks a {what} (found {found}) but "
                         f"{other.where} has one; give every row the same field")
    for r in rows:
        if field not in r.fields:
            raise InputError(f"{path}: {r.where} lacks the {field!r} field that {rows[0].where} "
                             f"has (found {keys(r)}); give every row a {field!r}")
    return field


def _string(path: pathlib.Path, row: Row, field: str) -> str:
    value = row.fields[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"{path}: {row.where}: {field!r} is {kind(value)}, expected a string; "
                         "write the text in quotes")
    text = value if isinstance(value, str) else str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud800"
        raise InputError(f"{path}: {row.where}: {field!r} holds an unpaired surrogate escape "
                         "(\\ud800-\\udfff); it is not text: fix the escape") from None
    return text


_ZERO = {"0", "0.0", "false"}
_ONE = {"1", "1.0", "true"}


def _label(value) -> int | None:
    """0 or 1; None when missing; raises ValueError for anything else."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in _ZERO | _ONE:
        return int(value.strip().lower() in _ONE)
    raise ValueError(value)


def _labels(path: pathlib.Path, rows: list[Row], require: bool) -> np.ndarray | None:
    """The rows' 0/1 labels; None without a label column (or a gap in it) unless `require`."""
    if not any("label" in r.fields for r in rows):
        if require:
            raise InputError(f"{path}: no 'label' column; probing needs binary labels 0/1 in a "
                             "'label' column")
        return None
    labels = []
    for r in rows:
        try:
            labels.append(_label(r.fields.get("label")))
        except ValueError:
            raise InputError(f"{path}: {r.where}: label {short(r.fields['label'])} is not 0 or 1; labels must be "
                             "exactly 0 or 1 (or true/false); fix the row, or rename the column "
                             "if it is not a binary label") from None
    gaps = [r.where for r, y in zip(rows, labels) if y is None]
    if gaps:
        if require:
            raise InputError(f"{path}: {len(gaps)} row(s) have no label, first at {gaps[0]}; "
                             "probing needs a label 0 or 1 on every row")
        return None
    out = np.array(labels, np.int32)
    if require and len(set(labels)) < 2:
        raise InputError(f"{path}: every label is {labels[0]}; a probe needs both classes (0 and 1)")
    return out


def corpus_paragraphs(name: str) -> list[str]:
    """The paragraphs (blank-line separated) of a bundled corpus, checksum-verified."""
    if name not in CORPORA:
        raise InputError(f"unknown corpus {name!r}; choose from {sorted(CORPORA)}")
    path = BUNDLED / CORPORA[name]
    store.verified_sha256(path)
    text = path.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


TOFU_SETS = ("forget01", "retain99", "real_authors_perturbed", "world_facts_perturbed")


def tofu(name: str) -> list[dict]:
    """A bundled TOFU set (see LICENSES/NOTICE.md) as a list of {'question', 'answer', ...}
    records, checksum-verified. forget01 (40) + retain99 (3960) is the full fictitious-author
    set; real_authors_perturbed (100) and world_facts_perturbed (117) measure utility."""
    if name not in TOFU_SETS:
        raise InputError(f"unknown TOFU set {name!r}; choose from {TOFU_SETS}")
    path = BUNDLED / "tofu" / f"{name}.json"
    store.verified_sha256(path)
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]


def _clean(text: str) -> str:
    return text.replace("_x000D_", "").strip()  # spreadsheet carriage-return leftovers in toxigen


# ---------------------------------------------------------------------------------------------
# detoxification: ToxiGen's seed statements and a TruthfulQA multiple-choice task

DEMONSTRATIONS = BUNDLED / "toxigen" / "demonstrations"
# demonstration file group -> the annotated file's target_group (immigrant has none there)
TOXIGEN_GROUPS = {"mental_disability": "mental_dis", "physical_disability": "physical_dis", "bisexual": "lgbtq",
                  "immigrant": None}


class Anchor(NamedTuple):
    text: str
    group: str  # the demonstration file's group: "black", "mental_disability", "bisexual", ...
    toxic: bool  # from a hate_ file (True) or a neutral_ file (False)


def toxigen_anchors() -> list[Anchor]:
    """ToxiGen's 597 seed statements (bundled, checksum-verified), in file-name order."""
    anchors = []
    for path in sorted(DEMONSTRATIONS.glob("*.txt")):
        store.verified_sha256(path)
        kind, _, group = path.stem.split("__", 1)[1].partition("_")
        group = group.removesuffix("_sentences")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                anchors.append(Anchor(line.strip(), group, kind == "hate"))
    return anchors


def toxigen_group(group: str) -> str | None:
    """The annotated file's target_group for a demonstration group (None: not annotated)."""
    return TOXIGEN_GROUPS.get(group, group)


class MultipleChoice(NamedTuple):
    question: str
    choices: list[str]
    answer: int  # index of the correct choice


def truthfulqa_mc() -> list[MultipleChoice]:
    """TruthfulQA as multiple choice (bundled TruthfulQA.csv, 790 questions): the best answer
    (choice 0) against the question's incorrect answers (at most 3, in file order)."""
    path = BUNDLED / "truthfulqa" / "TruthfulQA.csv"
    store.verified_sha256(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    tasks = []
    for row in rows:
        wrong = [a.strip() for a in row["Incorrect Answers"].split(";") if a.strip()][:3]
        if wrong:
            tasks.append(MultipleChoice(row["Question"].strip(), [row["Best Answer"].strip()] + wrong, 0))
    return tasks


def tofu_world_facts_mc() -> list[MultipleChoice]:
    """TOFU's world facts (117 questions) as multiple choice: the answer (choice 0) against its
    three perturbed answers."""
    return [MultipleChoice(r["question"], [r["answer"]] + list(r["perturbed_answer"]), 0)
            for r in tofu("world_facts_perturbed")]
