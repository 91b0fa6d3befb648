"""The one reader for users' files (`read_rows`, `load_texts`, `read_prompts`): whatever bytes a
file holds, the result is a valid parse or an `InputError` naming the file, never another
exception; and one regression test per case of issue 12, with the exact input it describes."""

from __future__ import annotations

import csv
import io
import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jtrust.core.errors import InputError, MissingInput
from jtrust.data import load_texts, read_prompts, read_rows

SUFFIXES = (".csv", ".jsonl", ".json", ".txt")
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_names = itertools.count()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory for hypothesis examples (function-scoped tmp_path does not mix with @given)."""
    return tmp_path_factory.mktemp("readers")


def write(directory, suffix: str, data: bytes):
    path = directory / f"f{next(_names)}{suffix}"
    path.write_bytes(data)
    return path


def check_texts(path, require_labels: bool):
    """load_texts either parses validly or raises an InputError naming the file."""
    try:
        ds = load_texts(str(path), require_labels=require_labels)
    except InputError as e:
        assert str(path) in str(e)
        return None
    assert ds.texts and all(isinstance(t, str) and t.strip() for t in ds.texts)
    if ds.labels is not None:
        assert ds.labels.shape == (len(ds.texts),) and set(ds.labels.tolist()) <= {0, 1}
    if require_labels:
        assert ds.labels is not None and set(ds.labels.tolist()) == {0, 1}
    return ds


def check_prompts(path):
    try:
        prompts, refs = read_prompts(path)
    except InputError as e:
        assert str(path) in str(e)
        return None
    assert prompts and all(isinstance(p, str) and p.strip() for p in prompts)
    assert refs is None or (len(refs) == len(prompts) and all(isinstance(r, str) for r in refs))
    return prompts, refs


def check_rows(path):
    try:
        rows = read_rows(path)
    except InputError as e:
        assert str(path) in str(e)
        return None
    assert isinstance(rows, list) and all(isinstance(r, dict) for r in rows)
    return rows


# ------------------------------------------------------------------ properties: arbitrary bytes

# pieces of the formats, so random files reach past the first parse error
FRAGMENTS = [b'{"text": ', b'"label": ', b'"question": ', b'"answer": ', b'"prompt": ', b"[", b"]",
             b"{", b"}", b",", b":", b'"', b"\n", b"\r\n", b"\r", b"0", b"1", b"0.7", b"true", b"null",
             b"text,label", b"question,answer", b'"a, b"', b"hello", b" ", b"\xff", b"\xc3\xa9",
             b"\xef\xbb\xbf", b"\x00", b"\\u", b"\\ud800", b"NaN", b"1e999", b"9" * 30, b"[" * 50]
RANDOM_FILES = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(b"".join),
)


@PROPERTY
@given(data=RANDOM_FILES, suffix=st.sampled_from(SUFFIXES), require_labels=st.booleans())
def test_load_texts_any_bytes(scratch, data, suffix, require_labels):
    check_texts(write(scratch, suffix, data), require_labels)


@PROPERTY
@given(data=RANDOM_FILES, suffix=st.sampled_from(SUFFIXES))
def test_read_prompts_and_rows_any_bytes(scratch, data, suffix):
    path = write(scratch, suffix, data)
    check_prompts(path)
    check_rows(path)


# ------------------------------------------------------------------ properties: structured files

KEYS = st.sampled_from(["text", "label", "statement", "question", "answer", "prompt", "reference",
                        "Question", "id", "", "x y"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                    st.sampled_from(["0", "1", "0.0", "1.0", "true", "False", " ", "", "0.7"]),
                    st.text(max_size=12))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=2), st.dictionaries(st.text(max_size=3),
                                                                            SCALARS, max_size=2))
ROWS = st.lists(st.dictionaries(KEYS, VALUES, max_size=5), max_size=8)


def as_jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@PROPERTY
@given(rows=ROWS, array=st.booleans(), suffix=st.sampled_from([".json", ".jsonl"]),
       require_labels=st.booleans())
def test_json_rows_with_random_keys_and_values(scratch, rows, array, suffix, require_labels):
    data = json.dumps(rows, indent=1).encode() if array else as_jsonl(rows)
    path = write(scratch, suffix, data)
    ds = check_texts(path, require_labels)
    check_prompts(path)
    parsed = check_rows(path)
    if suffix == ".json" or not array:  # a .jsonl holding one array is refused, rightly
        assert json.dumps(parsed, sort_keys=True) == json.dumps(rows, sort_keys=True)  # NaN too
    if ds is not None:
        assert len(ds.texts) == len(rows)


CELLS = st.one_of(st.text(max_size=10), st.sampled_from(["0", "1", "0.7", "", " ", "a,b", 'say "hi"',
                                                         "line\nbreak", "_x000D_"]))


@PROPERTY
@given(header=st.lists(KEYS, min_size=1, max_size=4),
       rows=st.lists(st.lists(CELLS, max_size=5), max_size=6), require_labels=st.booleans())
def test_csv_with_random_columns(scratch, header, rows, require_labels):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path = write(scratch, ".csv", buffer.getvalue().encode())
    ds = check_texts(path, require_labels)
    check_prompts(path)
    parsed = check_rows(path)
    if parsed is not None:  # only rows with as many fields as the header survive
        assert all(len(r) == len(set(header)) for r in parsed)
    if ds is not None:
        assert len(set(header)) == len(header)


# the round trip: valid rows read back exactly, whatever the format
GOOD_TEXT = st.text(st.characters(blacklist_categories=["Cs", "Cc", "Zl", "Zp"]), min_size=1,
                    max_size=20).filter(lambda t: t.strip() and "_x000D_" not in t)
GOOD_ROWS = st.lists(st.tuples(GOOD_TEXT, st.sampled_from([0, 1])), min_size=1, max_size=8)


@PROPERTY
@given(rows=GOOD_ROWS, fmt=st.sampled_from(["csv", "jsonl", "json", "txt"]))
def test_valid_rows_read_back_exactly(scratch, rows, fmt):
    texts = [t for t, _ in rows]
    labels = [y for _, y in rows]
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerows([("text", "label"), *rows])
        data = buffer.getvalue()
    elif fmt == "jsonl":
        data = as_jsonl([{"text": t, "label": y} for t, y in rows]).decode()
    elif fmt == "json":
        data = json.dumps([{"text": t, "label": y} for t, y in rows])
    else:
        data = "\n".join(texts) + "\n"
    ds = load_texts(str(write(scratch, "." + fmt, data.encode())))
    assert ds.texts == [t.strip() for t in texts]
    assert (ds.labels is None) if fmt == "txt" else ds.labels.tolist() == labels


# ------------------------------------------------------------------ regressions (issue 12)


def test_jsonl_row_without_text(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"statement": "b", "label": 1}\n')
    with pytest.raises(InputError, match="line 2 lacks the 'text' field") as err:  # was KeyError
        load_texts(str(path))
    assert str(path) in str(err.value)


def test_jsonl_bad_json_names_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(5))
    path.write_text(good + '{"text": "t5", "label": 1\n')
    with pytest.raises(InputError, match=r"line 6 column \d+: not valid JSON") as err:
        load_texts(str(path))  # said "line 1 column 20" before: the line within the line
    assert str(path) in str(err.value) and "fix that line" in str(err.value)


def test_jsonl_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": 0}\n["b", 1]\n')
    with pytest.raises(InputError, match="line 2 is an array, not a JSON object") as err:
        load_texts(str(path))
    assert str(path) in str(err.value)


def test_json_array_of_objects_loads(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    for indent in (None, 2):  # one line was a TypeError (sorted() of dicts), pretty-printed bad JSON
        path = tmp_path / f"rows{indent}.json"
        path.write_text(json.dumps(rows, indent=indent))
        ds = load_texts(str(path))
        assert ds.texts == ["a", "b"] and ds.labels.tolist() == [0, 1]
        assert read_rows(path) == rows


@pytest.mark.parametrize("content, message", [
    ('"just a string"', "holds a string, neither a JSON array of objects nor JSON lines"),
    ('[{"text": "a"}, 3]', "entry 2 of the JSON array is a number, not an object"),
    ('{"text": "a"}\n{"text": \n', "line 2 column 10: not valid JSON.*array of objects or one "
                                   "object per line"),
])
def test_json_that_is_neither_array_nor_lines(tmp_path, content, message):
    path = tmp_path / "rows.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        load_texts(str(path))
    assert str(path) in str(err.value)


def test_csv_field_longer_than_the_csv_default_limit(tmp_path):
    path = tmp_path / "long.csv"
    long = "word " * 40000  # 200000 characters; csv's default limit is 131072
    path.write_text(f"text,label\n{long},1\nshort,0\n")
    ds = load_texts(str(path))
    assert ds.texts == [long.strip(), "short"] and ds.labels.tolist() == [1, 0]


def test_csv_field_beyond_the_raised_limit(tmp_path, monkeypatch):
    import jtrust.data.files as files
    monkeypatch.setattr(files, "CSV_FIELD_LIMIT", 1000)
    limit = csv.field_size_limit(1000)  # as if the process-wide limit had never been raised
    try:
        path = tmp_path / "huge.csv"
        path.write_text("text,label\nok,0\n" + "x" * 5000 + ",1\n")
        with pytest.raises(InputError, match="line 3: not valid CSV.*longer than 1000 characters") as err:
            load_texts(str(path))
        assert str(path) in str(err.value)
    finally:
        csv.field_size_limit(limit)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_invalid_utf8_names_line_and_byte(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    body = {".csv": "text,label\nok,1\ncaf\xe9,0\n", ".jsonl": '{"text": "ok"}\n\n{"text": "caf\xe9"}\n',
            ".json": '[{"text": "ok"},\n\n {"text": "caf\xe9"}]', ".txt": "ok\n\ncaf\xe9\n"}[suffix]
    path.write_bytes(body.encode("latin-1"))
    offset = body.encode("latin-1").index(b"\xe9")
    for read in (lambda: load_texts(str(path)), lambda: read_prompts(path)):
        with pytest.raises(InputError, match=rf"not UTF-8 text: line 3 \(byte offset {offset}\) holds "
                                             r"the byte 0xe9; re-save the file as UTF-8") as err:
            read()
        assert str(path) in str(err.value)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\na,0\nb,1\n".encode("utf-8"))
    assert load_texts(str(path)).texts == ["a", "b"]


def test_short_csv_row_is_refused(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("label,text\n1,hello\n0\n")  # the text of row 2 was the string "None"
    with pytest.raises(InputError, match=r"line 3 has 1 fields but the header has 2 .*add the "
                                         "missing fields") as err:
        load_texts(str(path))
    assert str(path) in str(err.value)
    path.write_text("text,label\nhello, world,1\n")  # an unquoted comma: one field too many
    with pytest.raises(InputError, match="line 2 has 3 fields.*quote fields that contain commas"):
        load_texts(str(path))


@pytest.mark.parametrize("label", ["0.7", "1.9", "2", "-1", "yes", "nan"])
def test_labels_must_be_exactly_0_or_1(tmp_path, label):
    path = tmp_path / "labels.csv"
    path.write_text(f"text,label\na,0\nb,1\nc,{label}\n")  # 0.7 and 1.9 became 0 and 1
    for require in (False, True):
        with pytest.raises(InputError, match=rf"line 4: label '{label}' is not 0 or 1; labels must "
                                             "be exactly 0 or 1") as err:
            load_texts(str(path), require_labels=require)
        assert str(path) in str(err.value)
    path = tmp_path / "labels.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 0.7}\n')
    with pytest.raises(InputError, match="line 2: label 0.7 is not 0 or 1"):
        load_texts(str(path))


def test_label_spellings_accepted(tmp_path):
    path = tmp_path / "labels.jsonl"
    values = [0, 1, 0.0, 1.0, "0", "1", "0.0", "1.0", True, False, "true", "False", " 1 "]
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": v}) + "\n"
                            for i, v in enumerate(values)))
    assert load_texts(str(path)).labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1]


def test_labels_required_only_where_needed(tmp_path):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\na,1\nb,1\n")
    unlabelled = tmp_path / "plain.jsonl"
    unlabelled.write_text('{"text": "a"}\n{"text": "b"}\n')
    gap = tmp_path / "gap.csv"
    gap.write_text("text,label\na,1\nb,\n")
    # extraction needs no labels: every one of these loads
    assert load_texts(str(one_class)).labels.tolist() == [1, 1]
    assert load_texts(str(unlabelled)).labels is None
    assert load_texts(str(gap)).labels is None
    # probes do
    with pytest.raises(InputError, match="every label is 1; a probe needs both classes"):
        load_texts(str(one_class), require_labels=True)
    with pytest.raises(InputError, match="no 'label' column; probing needs binary labels"):
        load_texts(str(unlabelled), require_labels=True)
    with pytest.raises(InputError, match="1 row.* have no label, first at line 3"):
        load_texts(str(gap), require_labels=True)


def test_read_prompts_missing_answer_names_field_and_entry(tmp_path):
    path = tmp_path / "forget.json"
    path.write_text(json.dumps([{"question": "Q1", "answer": "A1"}, {"question": "Q2", "answer": "A2"},
                                {"question": "Q3"}]))
    with pytest.raises(InputError, match="entry 3 lacks the 'answer' field that entry 1 has") as err:
        read_prompts(path)
    assert str(path) in str(err.value)
    path = tmp_path / "forget.jsonl"
    path.write_text('{"question": "Q1", "answer": "A1"}\n{"prompt": "Q2", "answer": "A2"}\n')
    with pytest.raises(InputError, match="line 2 lacks the 'question' field that line 1 has"):
        read_prompts(path)


def test_read_prompts_formats(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('question,answer\n"Q1, with a comma",A1\nQ2,A2\n')
    assert read_prompts(csv_path) == (["Q1, with a comma", "Q2"], ["A1", "A2"])
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "P1", "reference": 4}\n{"prompt": "P2", "reference": "x"}\n')
    assert read_prompts(jsonl) == (["P1", "P2"], ["4", "x"])
    with pytest.raises(MissingInput, match="no prompts file"):
        read_prompts(tmp_path / "absent.json")
    null = tmp_path / "null.json"
    null.write_text('[{"question": null}]')
    with pytest.raises(InputError, match="entry 1: 'question' is null, expected a string"):
        read_prompts(null)


def test_unsupported_suffix_and_missing_file(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text("text\ta\n")
    with pytest.raises(InputError, match=r"unsupported file type '.tsv'; use .csv, .jsonl, .json or .txt"):
        load_texts(str(path))
    with pytest.raises(MissingInput, match="no dataset at"):
        load_texts(str(tmp_path / "absent.csv"))
    with pytest.raises(FileNotFoundError):  # MissingInput is still a FileNotFoundError
        read_rows(tmp_path / "absent.csv")


def test_deeply_nested_and_huge_numbers(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(InputError, match="line 1: unreadable JSON") as err:  # RecursionError
        load_texts(str(path))
    assert str(path) in str(err.value)
    path.write_text('{"text": "a", "label": ' + "9" * 5000 + "}\n")  # int() digit limit
    with pytest.raises(InputError, match="line 1: unreadable JSON"):
        load_texts(str(path))


def test_bundled_sets_unchanged():
    """The bundled files go through the same reader: counts and labels as before."""
    ds = load_texts("fairness")
    assert len(ds.texts) == 1952 and int(np.sum(ds.labels)) == 976
