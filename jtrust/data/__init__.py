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

import collections
import csv
import hashlib
import io
import json
import os
import pathlib
from typing import Any, Iterator, NamedTuple

import numpy as np

from jtrust.core import store
from jtrust.core.errors import InputError, MissingInput

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
SUFFIXES = (".csv", ".jsonl", ".json", ".txt")
# csv's default limit is 131072 characters per field; texts may be longer, but not unboundedly
CSV_FIELD_LIMIT = 1 << 24
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


class _Row(NamedTuple):
    where: str  # "line 6" (csv, jsonl, txt) or "entry 3" (a JSON array), counted from 1
    fields: dict


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
    data = _read_bytes(path)
    rows = _located_rows(path, data)
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
    rows = _located_rows(path, _read_bytes(path), txt_field="prompt")
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
    return [r.fields for r in _located_rows(path, _read_bytes(path))]


def _read_bytes(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror or e}); check its permissions") from e


def _located_rows(path: pathlib.Path, data: bytes, txt_field: str = "text") -> list[_Row]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .jsonl, .json "
                         "or .txt")
    text = _decode(path, data)
    if suffix == ".csv":
        return _csv_rows(path, text)
    if suffix == ".txt":
        return [_Row(f"line {i}", {txt_field: line})
                for i, line in enumerate(_lines(text), 1) if line.strip()]
    if suffix == ".json":
        if text.lstrip().startswith("["):
            return _json_array_rows(path, text)
        try:
            whole = json.loads(text)
        except (ValueError, RecursionError):
            whole = None  # not one JSON value: read it as JSON lines
        else:
            if not isinstance(whole, dict):
                raise InputError(f"{path}: holds {_kind(whole)}, neither a JSON array of objects nor "
                                 'JSON lines; expected [{"text": ...}, ...] or one object per line')
            return [_Row("the top-level object", whole)]
    return _json_lines_rows(path, text, suffix)


def _lines(text: str) -> list[str]:
    """Lines as an editor numbers them (LF, CRLF or CR), not str.splitlines (which also splits
    at U+2028, form feeds, ... that JSON strings may hold)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _decode(path: pathlib.Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is dropped
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = len(_lines(data[:start].decode("utf-8", errors="replace")))
        raise InputError(f"{path}: not UTF-8 text: line {line} (byte offset {start}) holds the byte "
                         f"0x{data[start]:02x}; re-save the file as UTF-8") from None


def _csv_rows(path: pathlib.Path, text: str) -> list[_Row]:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, header, line = [], None, 1
    try:
        for record in reader:
            start, line = line, reader.line_num + 1  # the record spans lines start..line_num
            if not record or (len(record) == 1 and not record[0].strip() and header is not None):
                continue  # blank line
            if header is None:
                header = record
                duplicated = sorted(h for h, n in collections.Counter(header).items() if n > 1)
                if duplicated:
                    raise InputError(f"{path}: line {start}: the header names {duplicated} more "
                                     "than once; give every column its own name")
                continue
            if len(record) != len(header):
                few = len(record) < len(header)
                raise InputError(
                    f"{path}: line {start} has {len(record)} fields but the header has "
                    f"{len(header)} ({_short(header)[1:-1]}); "
                    + ("add the missing fields" if few else
                       "quote fields that contain commas (\"like, this\")"))
            rows.append(_Row(f"line {start}", dict(zip(header, record))))
    except csv.Error as e:
        limit = "field larger than field limit" in str(e)
        raise InputError(
            f"{path}: line {reader.line_num}: not valid CSV ({e}); "
            + (f"a field is longer than {CSV_FIELD_LIMIT} characters: split the text"
               if limit else "check the quoting on that line")) from None
    return rows


def _json_array_rows(path: pathlib.Path, text: str) -> list[_Row]:
    value = _json(path, text, None)
    if not isinstance(value, list):  # text starting with "[" that parses is a list
        raise InputError(f"{path}: expected a JSON array of objects")
    rows = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise InputError(f"{path}: entry {i} of the JSON array is {_kind(item)}, not an object; "
                             'expected [{"text": ...}, ...]')
        rows.append(_Row(f"entry {i}", item))
    return rows


def _json_lines_rows(path: pathlib.Path, text: str, suffix: str) -> list[_Row]:
    rows = []
    for i, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        item = _json(path, line, i, hint=suffix == ".json")
        if not isinstance(item, dict):
            raise InputError(f"{path}: line {i} is {_kind(item)}, not a JSON object; JSON lines "
                             'hold one object per line, like {"text": "...", "label": 1}')
        rows.append(_Row(f"line {i}", item))
    return rows


def _json(path: pathlib.Path, text: str, line: int | None, hint: bool = False) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {line if line is not None else e.lineno} column {e.colno}"
        shape = ("; a .json file holds an array of objects or one object per line (JSON lines)"
                 if hint else "")
        raise InputError(f"{path}: {where}: not valid JSON ({e.msg}){shape}; fix that line") from None
    except (ValueError, RecursionError) as e:  # huge integers, nesting deeper than Python's stack
        where = f"line {line}" if line is not None else "the array"
        raise InputError(f"{path}: {where}: unreadable JSON ({type(e).__name__}: "
                         f"{str(e)[:120]}); rows must be flat objects of strings and numbers") from None


def _kind(value) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _keys(row: _Row) -> str:
    keys = sorted(map(str, row.fields))
    return str(keys) if len(keys) <= 8 else f"{keys[:8]} and {len(keys) - 8} more"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pick_field(path: pathlib.Path, rows: list[_Row], candidates: tuple[str, ...], what: str) -> str:
    """The first of `candidates` the first row has; every other row must have it too."""
    field = next((c for c in candidates if c in rows[0].fields), None)
    if field is None:
        other = next((r for r in rows if any(c in r.fields for c in candidates)), None)
        found = _keys(rows[0])
        if other is None:
            raise InputError(f"{path}: no {what} (found {found}); rename the column that holds "
                             f"the text to one of {', '.join(map(repr, candidates))}")
        raise InputError(f"{path}: {rows[0].where} lacks a {what} (found {found}) but "
                         f"{other.where} has one; give every row the same field")
    for r in rows:
        if field not in r.fields:
            raise InputError(f"{path}: {r.where} lacks the {field!r} field that {rows[0].where} "
                             f"has (found {_keys(r)}); give every row a {field!r}")
    return field


def _string(path: pathlib.Path, row: _Row, field: str) -> str:
    value = row.fields[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"{path}: {row.where}: {field!r} is {_kind(value)}, expected a string; "
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


def _labels(path: pathlib.Path, rows: list[_Row], require: bool) -> np.ndarray | None:
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
            raise InputError(f"{path}: {r.where}: label {_short(r.fields['label'])} is not 0 or 1; labels must be "
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
