"""ROUGE-L between two texts, as the `rouge_score` package computes it with its default
tokenizer and no stemmer (lowercase, runs of non-alphanumerics as separators)."""

from __future__ import annotations

import re


def rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """LCS(prediction, reference) / |reference| in tokens (TOFU's forget metric)."""
    ref = rouge_tokens(reference)
    return lcs_length(rouge_tokens(prediction), ref) / len(ref) if ref else 0.0


def rouge_l_f1(prediction: str, reference: str) -> float:
    """The F-measure of LCS precision (over |prediction|) and recall (over |reference|)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    return 0.0 if lcs == 0 else 2 * lcs / (len(pred) + len(ref))


def exact_match(prediction: str, reference: str) -> float:
    """1 if the answer equals the reference up to case and punctuation, else 0."""
    return float(rouge_tokens(prediction) == rouge_tokens(reference))
