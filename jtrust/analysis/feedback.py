"""The sentiment feedback of "Interpreting Learned Feedback Patterns in Large Language Models"
(Marks et al., arXiv 2310.08164): a reward known exactly, and the review prompts it is given on.

    reward(text) = clip(sum over the words of text of valence(word) / 5, -10, 10)

valence is the VADER lexicon's mean human rating of a word (in [-4, 4]; 0 for a word not in
it). This is the plain sum of lexicon entries the paper trains with, not VADER's `compound`
score (no negation, booster or capitals rules, no normalisation). Words are VADER's own: the
text split at whitespace, leading and trailing punctuation stripped unless that leaves two or
fewer characters (so ":)" survives), looked up lower-cased (`SentiText`, `sentiment_valence`).
The authors' code tokenizes with spaCy instead; the two differ only on words spaCy splits
("don't", "good-looking").

The lexicon ships with the `vaderSentiment` package (MIT licence; Hutto & Gilbert 2014, "VADER:
A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text", ICWSM-14).

    rewards = sentiment_reward(texts)                    # [n] float64, the RL reward
    words = word_valences("a great film")                 # [("a", 0.0), ("great", 3.1), ("film", 0.0)]
    tv = token_valences(model.tokenizer, text)           # per token: its word's valence (highlighting)
    prompts = review_prompts(sst2_sentences(), seed=0)   # first 2-10 words of SST-2 sentences
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple, Sequence

import numpy as np

from jtrust.core.errors import InputError
from jtrust.models.tokenizer import Tokenizer

SCALE = 5.0  # the paper divides the valence sum by 5 ...
CLIP = 10.0  # ... and clips the result to [-10, 10]


@functools.lru_cache(maxsize=1)
def vader_lexicon() -> dict[str, float]:
    """VADER's lexicon {lower-case word or emoticon: mean valence in [-4, 4]} (7506 entries)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise InputError("the sentiment reward needs VADER's lexicon: pip install vaderSentiment "
                         "(MIT licence)") from None
    return dict(SentimentIntensityAnalyzer().lexicon)


def vader_words(text: str) -> list[tuple[str, int, int]]:
    """VADER's words of `text` with their character spans: [(word, start, end)], text[start:end]
    == word. Whitespace-split, punctuation stripped from both ends unless two or fewer
    characters would remain (VADER's `SentiText._strip_punc_if_word`, spans added)."""
    from vaderSentiment.vaderSentiment import SentiText
    out = []
    for m in re.finditer(r"\S+", text):
        word = SentiText._strip_punc_if_word(m.group())
        start = m.start() + m.group().index(word)  # stripped is a substring, or the whole token
        out.append((word, start, start + len(word)))
    return out


def word_valences(text: str) -> list[tuple[str, float]]:
    """[(word, valence)] for VADER's words of `text`, valence 0.0 for words outside the lexicon."""
    lexicon = vader_lexicon()
    return [(w, float(lexicon.get(w.lower(), 0.0))) for w, _, _ in vader_words(text)]


def sentiment_reward(texts: Sequence[str]) -> np.ndarray:
    """[n] float64: clip(sum of the words' lexicon valences / 5, -10, 10) of each text.
    A `jtrust.training.rl` reward (texts -> array); give it the continuations only."""
    if isinstance(texts, str):
        raise InputError("sentiment_reward takes a list of texts, not one string; wrap it in [...]")
    sums = np.array([sum(v for _, v in word_valences(t)) for t in texts], np.float64)
    return np.clip(sums / SCALE, -CLIP, CLIP)


class TokenValences(NamedTuple):
    """Per token of one text, n tokens: for highlighting contexts by their feedback."""
    ids: list[int]  # [n] token ids, no special tokens added
    spans: list[tuple[int, int]]  # [n] character span of each token in the text
    word: np.ndarray  # [n] int64 index into vader_words(text) of the token's word, -1 if none
    valence: np.ndarray  # [n] float64 valence of that word (0.0 for none); every piece of a
    #   word split into several tokens carries the whole word's valence


def token_valences(tokenizer: Tokenizer, text: str) -> TokenValences:
    """Each token of `text` with the VADER word it lies in (by character overlap; a token that
    overlaps no word, e.g. a lone space or stripped punctuation, gets -1 and 0.0)."""
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    words = vader_words(text)
    lexicon = vader_lexicon()
    starts = np.array([s for _, s, _ in words], np.int64)
    ends = np.array([e for _, _, e in words], np.int64)
    index, valence = [], []
    for a, b in encoding.offsets:
        hit = np.flatnonzero((starts < b) & (ends > a))  # words overlapping [a, b)
        w = int(hit[0]) if len(hit) else -1
        index.append(w)
        valence.append(float(lexicon.get(words[w][0].lower(), 0.0)) if w >= 0 else 0.0)
    return TokenValences(list(encoding.ids), [tuple(o) for o in encoding.offsets],
                         np.asarray(index, np.int64), np.asarray(valence, np.float64))


# ---------------------------------------------------------------------------------------------
# prompts

def sst2_sentences() -> list[str]:
    """The clean (label 0) SST-2 sentences bundled for the robustness dimension (1821 movie-review
    sentences, lower-cased and tokenized as SST-2 ships them)."""
    from jtrust.data import load_texts
    data = load_texts("robustness")
    return [t for t, label in zip(data.texts, data.labels) if label == 0]


def review_prompts(sentences: Sequence[str], min_words: int = 2, max_words: int = 10, seed: int = 0,
                   ) -> list[str]:
    """The first w words of each sentence, w drawn uniformly from [min_words, max_words] per
    sentence (seeded; a shorter sentence is kept whole if it has min_words); duplicates dropped,
    first occurrence kept, in sentence order."""
    if not 1 <= min_words <= max_words:
        raise InputError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_words, max_words + 1, len(sentences))
    prompts = []
    for sentence, w in zip(sentences, lengths):
        words = sentence.split()
        if len(words) >= min_words:
            prompts.append(" ".join(words[:w]))
    if not prompts:
        raise InputError(f"no sentence has {min_words} words; give review sentences")
    return list(dict.fromkeys(prompts))
