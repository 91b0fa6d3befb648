"""jtrust.analysis.feedback: the sentiment reward against sums worked out by hand from the lexicon
file vaderSentiment ships (read here line by line), its clip, the per-token valences on a BPE
tokenizer, and the SST-2 review prompts."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import tokenizers

from helpers import tiny_tokenizer_json
from jtrust.analysis import feedback as F
from jtrust.core.errors import InputError
from jtrust.models.tokenizer import Tokenizer

vader = pytest.importorskip("vaderSentiment.vaderSentiment")


def lexicon_file() -> dict[str, float]:
    """word -> mean valence from the tab-separated vader_lexicon.txt (a later line wins, as in
    VADER's make_lex_dict: "ok" is listed twice)."""
    path = pathlib.Path(vader.__file__).parent / "vader_lexicon.txt"
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            word, mean = line.split("\t")[:2]
            out[word] = float(mean)
    return out


def test_lexicon_is_vaders():
    lex = lexicon_file()
    assert F.vader_lexicon() == lex and len(lex) == 7506
    assert (lex["great"], lex["love"], lex["good"], lex["bad"], lex[":)"]) == (3.1, 3.2, 1.9, -2.5, 2.0)


@pytest.mark.parametrize("text, words", [
    # VADER's words: whitespace split, punctuation stripped unless <= 2 characters remain
    ("This movie is GREAT, I love it!", ["great", "love"]),  # "it!" keeps its "!"; lower-cased lookup
    ("not good, not bad :)", ["good", "bad", ":)"]),  # a plain sum: no negation rule
    ("a dull, boring and horrible film...", ["dull", "boring", "horrible"]),
    ("kind of fun", ["kind", "fun"]),  # VADER's compound would drop "kind of"; the sum does not
    ("the plot , the cast", []),
    ("", []),
])
def test_reward_is_the_lexicon_sum_over_five(text, words):
    lex = lexicon_file()
    want = sum(lex[w] for w in words) / 5
    assert F.sentiment_reward([text])[0] == pytest.approx(want, abs=1e-12)
    assert [w.lower() for w, v in F.word_valences(text) if v != 0] == words


def test_hand_computed_values_and_the_clip():
    got = F.sentiment_reward(["This movie is GREAT, I love it!", "not good, not bad :)",
                              "great " * 20, "worst " * 20, "horrible " * 20])
    # (3.1 + 3.2) / 5; (1.9 - 2.5 + 2.0) / 5; 62 / 5 -> 10; -62 / 5 -> -10; -50 / 5 = -10 exactly
    np.testing.assert_allclose(got, [1.26, 0.28, 10.0, -10.0, -10.0], atol=1e-12)
    assert got.dtype == np.float64
    # not VADER's compound: "not good" is positive here, negative there
    assert F.sentiment_reward(["not good"])[0] == pytest.approx(0.38)
    assert vader.SentimentIntensityAnalyzer().polarity_scores("not good")["compound"] < 0
    with pytest.raises(InputError, match="list of texts"):
        F.sentiment_reward("great")


def test_token_valences_mark_every_piece_of_a_word():
    tok = Tokenizer(tokenizers.Tokenizer.from_str(tiny_tokenizer_json()), bos_id=1, eos_id=2, pad_id=0)
    text = "Trust is great, but verify the horrible fox."
    tv = F.token_valences(tok, text)
    words = F.vader_words(text)
    assert tv.ids == tok.backend.encode(text, add_special_tokens=False).ids
    assert len(tv.spans) == len(tv.word) == len(tv.valence) == len(tv.ids)
    lex = lexicon_file()
    for (a, b), w, v in zip(tv.spans, tv.word, tv.valence):
        if w < 0:  # a token outside every word: spaces, the stripped "," and "."
            assert text[a:b].strip(" ,.") == "" and v == 0.0
        else:
            word, start, end = words[w]
            assert start < b and a < end and text[start:end] == word  # overlaps its word
            assert v == lex.get(word.lower(), 0.0)
    great = [i for i, w in enumerate(tv.word) if w >= 0 and words[w][0] == "great"]
    horrible = [i for i, w in enumerate(tv.word) if w >= 0 and words[w][0] == "horrible"]
    assert len(horrible) > 1  # not in the tiny vocabulary: several pieces, each marked
    assert all(tv.valence[i] == 3.1 for i in great) and all(tv.valence[i] == -2.5 for i in horrible)
    # each word's valence once: five times the reward
    marked = {w: v for w, v in zip(tv.word, tv.valence) if w >= 0}
    assert sum(marked.values()) / 5 == pytest.approx(F.sentiment_reward([text])[0])


def test_review_prompts_from_sst2():
    sentences = F.sst2_sentences()
    assert len(sentences) == 1821 and all(s == s.strip() for s in sentences)
    prompts = F.review_prompts(sentences, 2, 10, seed=0)
    assert prompts == F.review_prompts(sentences, 2, 10, seed=0) != F.review_prompts(sentences, 2, 10, seed=1)
    assert len(prompts) == len(set(prompts)) > 1700
    assert all(2 <= len(p.split()) <= 10 for p in prompts)
    heads = {" ".join(s.split()[:n]) for s in sentences for n in range(2, 11)}
    assert set(prompts) <= heads  # every prompt is the first words of a sentence
    lengths = np.bincount([len(p.split()) for p in prompts], minlength=11)[2:]
    assert lengths.min() > 0.5 * lengths.mean()  # about uniform over 2..10
    assert F.review_prompts(["one", "two words here", "two words there"], 2, 2) == ["two words"]
    with pytest.raises(InputError, match="min_words"):
        F.review_prompts(sentences, 5, 3)
