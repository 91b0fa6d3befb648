"""Copy the TinyStories heads from a source folder into jtrust/data/corpus, cleaned.

The cleaning is the one the source's README lists: UTF-8 read as cp1252 and
re-encoded ("mojibake") is mapped back to ASCII punctuation, then any other non-ASCII
character is dropped. Run once by a maintainer; users get the result in the package.

    python experiments/bundle_corpus.py --src path/to/corpus   # holds tinystories/*.txt
"""
import argparse
import hashlib
import pathlib
import re

# cp1252 renderings of UTF-8 punctuation; the dashes appear as both the Unicode dash and
# the cp1252 quote byte (0x93/0x94) after the mojibake prefix
MOJIBAKE = (
    ("\u00e2\u20ac\u0153", '"'),                     # left double quote
    ("\u00e2\u20ac\u2122", "'"),                     # right single quote / apostrophe
    ("\u00e2\u20ac\u02dc", "'"),                     # left single quote
    ("\u00e2\u20ac\u201c", "-"), ("\u00e2\u20ac\u2013", "-"),   # en dash
    ("\u00e2\u20ac\u201d", "-"), ("\u00e2\u20ac\u2014", "-"),   # em dash
    ("\u00e2\u20ac\u00a6", "..."),                   # ellipsis
    ("\u00e2\u20ac", '"'),                           # right double quote lost its last byte
)
FILES = ("tinystories/tinystories_train_head_lowercase.txt", "tinystories/tinystories_val_head.txt")


def clean(text: str) -> str:
    for bad, good in MOJIBAKE:
        text = text.replace(bad, good)
    return re.sub(r"[^\x00-\x7f]", "", text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="folder holding tinystories/*.txt")
    parser.add_argument("--dst", default=str(pathlib.Path(__file__).parents[1] / "jtrust/data/corpus"))
    args = parser.parse_args()
    sums = []
    for name in FILES:
        raw = (pathlib.Path(args.src) / name).read_bytes()
        cleaned = clean(raw.decode("utf-8")).encode("ascii")
        out = pathlib.Path(args.dst) / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(cleaned)
        digest = hashlib.sha256(cleaned).hexdigest()
        sums.append(f"{digest}  {out.name}")
        print(f"{name}: {len(raw):,} -> {len(cleaned):,} bytes; source sha256 "
              f"{hashlib.sha256(raw).hexdigest()}, cleaned {digest}")
    (pathlib.Path(args.dst) / "tinystories/SHA256SUMS").write_text("\n".join(sums) + "\n")


if __name__ == "__main__":
    main()
