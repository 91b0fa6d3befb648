"""Datasets jtrust ships (the five TracingLLM trust sets) and a loader for a user's own.

`load_texts(name_or_path)` returns `LabelledTexts`: the bundled sets by dimension name
(reliability, toxicity, privacy, fairness, robustness), checksum-verified; or a
user's CSV / JSONL file with a `text` (or `statement`) column and an optional
binary `label` column. `iter_examples` yields the same rows one dict at a time;
`jtrust.data.builders` serves the bundled sets as tensorflow-datasets builders.
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Iterator, NamedTuple

import numpy as np

from jtrust.core import store

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
    """A bundled trust set by dimension name, or a user's .csv / .jsonl / .txt file."""
    if name_or_path in TRUST_DATASETS:
        path = BUNDLED / TRUST_DATASETS[name_or_path][0]
        digest = store.verified_sha256(path)
        name = name_or_path
    else:
        path = pathlib.Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no dataset at {path}: pass one of {sorted(TRUST_DATASETS)} or "
                                    "a .csv/.jsonl file with a 'text' column (and 'label' 0/1)")
        digest = store.file_hash(path)
        name = path.stem
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: the file holds no rows")
    text_col = next((c for c in _TEXT_COLUMNS if c in rows[0]), None)
    if text_col is None:
        raise ValueError(f"{path}: no text column; expected one of {_TEXT_COLUMNS}, found "
                         f"{sorted(rows[0])}")
    texts = [_clean(str(r[text_col])) for r in rows]
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"{path}: {len(empty)} empty texts, first at row {empty[0]}")
    labels = None
    if "label" in rows[0]:
        labels = _binary_labels([r.get("label") for r in rows], path)
    elif require_labels:
        raise ValueError(f"{path}: no 'label' column; probing needs binary labels 0/1")
    return LabelledTexts(name, texts, labels, digest)


def iter_examples(name_or_path: str) -> Iterator[dict]:
    """{"text": str, "label": int, "index": int} per row of `load_texts(name_or_path)`, in file order."""
    ds = load_texts(name_or_path, require_labels=True)  # here, so a bad path fails at the call
    return ({"text": text, "label": label, "index": index}
            for index, (text, label) in enumerate(zip(ds.texts, ds.labels.tolist())))


def _read_rows(path: pathlib.Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            return [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON lines ({e})") from e
    if path.suffix == ".txt":
        return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .jsonl or .txt")


def _binary_labels(values, path) -> np.ndarray:
    try:
        labels = np.array([int(float(v)) for v in values], np.int32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: labels must be 0 or 1 ({e})") from e
    found = set(np.unique(labels).tolist())
    if not found <= {0, 1}:
        raise ValueError(f"{path}: labels must be binary 0/1, found {sorted(found)}")
    if len(found) < 2:
        raise ValueError(f"{path}: every label is {found.pop()}; a probe needs both classes")
    return labels


def corpus_paragraphs(name: str) -> list[str]:
    """The paragraphs (blank-line separated) of a bundled corpus, checksum-verified."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose from {sorted(CORPORA)}")
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
        raise ValueError(f"unknown TOFU set {name!r}; choose from {TOFU_SETS}")
    path = BUNDLED / "tofu" / f"{name}.json"
    store.verified_sha256(path)
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]


def _clean(text: str) -> str:
    return text.replace("_x000D_", "").strip()  # spreadsheet carriage-return leftovers in toxigen
