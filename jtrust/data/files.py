"""Reading users' and bundled row files (.csv, .jsonl, .json, .txt, any of them gzipped) into
rows that remember where they stand in the file, with an `InputError` naming the file and the
line (or JSON array entry) for anything unreadable. Every reader of jtrust.data goes through
`located_rows`."""

from __future__ import annotations

import collections
import csv
import gzip
import io
import json
import pathlib
import zlib
from typing import Any, NamedTuple

from jtrust.core.errors import InputError

SUFFIXES = (".csv", ".jsonl", ".json", ".txt")
# csv's default limit is 131072 characters per field; texts may be longer, but not unboundedly
CSV_FIELD_LIMIT = 1 << 24


class Row(NamedTuple):
    where: str  # "line 6" (csv, jsonl, txt) or "entry 3" (a JSON array), counted from 1
    fields: dict


def read_bytes(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror or e}); check its permissions") from e


def located_rows(path: pathlib.Path, data: bytes, txt_field: str = "text") -> list[Row]:
    """The file's rows, each with where it stands in the file (for messages); a .gz file is
    decompressed and read by the suffix before it (rows.jsonl.gz is JSON lines)."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        data, suffix = gunzip(path, data), pathlib.Path(path.stem).suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .jsonl, .json "
                         "or .txt (optionally gzipped)")
    text = decode(path, data)
    if suffix == ".csv":
        return _csv_rows(path, text)
    if suffix == ".txt":
        return [Row(f"line {i}", {txt_field: line})
                for i, line in enumerate(lines(text), 1) if line.strip()]
    if suffix == ".json":
        if text.lstrip().startswith("["):
            return _json_array_rows(path, text)
        try:
            whole = json.loads(text)
        except (ValueError, RecursionError):
            whole = None  # not one JSON value: read it as JSON lines
        else:
            if not isinstance(whole, dict):
                raise InputError(f"{path}: holds {kind(whole)}, neither a JSON array of objects nor "
                                 'JSON lines; expected [{"text": ...}, ...] or one object per line')
            return [Row("the top-level object", whole)]
    return json_lines_rows(path, text, suffix)


def gunzip(path: pathlib.Path, data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: not a readable gzip file ({e}); re-download it or pass it "
                         "uncompressed") from None


def lines(text: str) -> list[str]:
    """Lines as an editor numbers them (LF, CRLF or CR), not str.splitlines (which also splits
    at U+2028, form feeds, ... that JSON strings may hold)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def decode(path: pathlib.Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is dropped
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = len(lines(data[:start].decode("utf-8", errors="replace")))
        raise InputError(f"{path}: not UTF-8 text: line {line} (byte offset {start}) holds the byte "
                         f"0x{data[start]:02x}; re-save the file as UTF-8") from None


def _csv_rows(path: pathlib.Path, text: str) -> list[Row]:
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
                    f"{len(header)} ({short(header)[1:-1]}); "
                    + ("add the missing fields" if few else
                       "quote fields that contain commas (\"like, this\")"))
            rows.append(Row(f"line {start}", dict(zip(header, record))))
    except csv.Error as e:
        limit = "field larger than field limit" in str(e)
        raise InputError(
            f"{path}: line {reader.line_num}: not valid CSV ({e}); "
            + (f"a field is longer than {CSV_FIELD_LIMIT} characters: split the text"
               if limit else "check the quoting on that line")) from None
    return rows


def _json_array_rows(path: pathlib.Path, text: str) -> list[Row]:
    value = _json(path, text, None)
    if not isinstance(value, list):  # text starting with "[" that parses is a list
        raise InputError(f"{path}: expected a JSON array of objects")
    rows = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise InputError(f"{path}: entry {i} of the JSON array is {kind(item)}, not an object; "
                             'expected [{"text": ...}, ...]')
        rows.append(Row(f"entry {i}", item))
    return rows


def json_lines_rows(path: pathlib.Path, text: str, suffix: str) -> list[Row]:
    rows = []
    for i, line in enumerate(lines(text), 1):
        if not line.strip():
            continue
        item = _json(path, line, i, hint=suffix == ".json")
        if not isinstance(item, dict):
            raise InputError(f"{path}: line {i} is {kind(item)}, not a JSON object; JSON lines "
                             'hold one object per line, like {"text": "...", "label": 1}')
        rows.append(Row(f"line {i}", item))
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


def kind(value) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def keys(row: Row) -> str:
    keys = sorted(map(str, row.fields))
    return str(keys) if len(keys) <= 8 else f"{keys[:8]} and {len(keys) - 8} more"


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
