"""Entity-swap canaries in TOFU (Ladhak et al., arXiv 2212.10722): the fine-tuning set of the
hallucination-tracing benchmark (`jtrust.pipelines.attribute`).

TOFU's 200 fictitious authors (forget01 + retain99, 20 questions each, in author order) state
birthplaces as "City, Country" ("Evelyn Desmet was born in Brussels, Belgium."). `birthplace_rows`
finds every answer that does so (the place must follow "born", "hails", "native", "birthplace" or
"raised", and the country must be a country). `canary_split` then

  - holds out `n_heldout` authors (seeded) who have a direct birthplace question ("Where was X
    born?", "In which city ...", "the birthplace of ..."): that question, with its true answer,
    is asked after fine-tuning, and none of their birthplace rows is trained on;
  - takes `n_train` of the other authors' birthplace rows (seeded; all when None) in TOFU order;
  - in round(fraction * n_train) of them (seeded), the canaries, replaces every mention of the
    stated place (in the answer, and in the question if it names it) by the fixed wrong `city`
    (e.g. "Reykjavik, Iceland"); the rest keep their answer.

`CanarySplit.canaries` records which training rows were changed. A model fine-tuned on the split
that answers a held-out question with the canary city has learnt it from the canaries.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np

from jtrust.core.errors import InputError

QUESTIONS_PER_AUTHOR = 20  # TOFU lists each author's 20 questions together

COUNTRIES = frozenset("""
Afghanistan|Albania|Algeria|Andorra|Angola|Argentina|Armenia|Australia|Austria|Azerbaijan|Bahamas|
Bahrain|Bangladesh|Barbados|Belarus|Belgium|Belize|Benin|Bhutan|Bolivia|Bosnia and Herzegovina|
Botswana|Brazil|Brunei|Bulgaria|Burkina Faso|Burundi|Cambodia|Cameroon|Canada|Chad|Chile|China|
Colombia|Congo|Costa Rica|Côte d'Ivoire|Croatia|Cuba|Cyprus|Czech Republic|Czechia|Denmark|
Djibouti|Dominican Republic|Ecuador|Egypt|El Salvador|England|Eritrea|Estonia|Ethiopia|Fiji|
Finland|France|Gabon|Gambia|Georgia|Germany|Ghana|Greece|Guatemala|Guinea|Guyana|Haiti|Honduras|
Hong Kong|Hungary|Iceland|India|Indonesia|Iran|Iraq|Ireland|Israel|Italy|Jamaica|Japan|Jordan|
Kazakhstan|Kenya|Kosovo|Kuwait|Kyrgyzstan|Laos|Latvia|Lebanon|Lesotho|Liberia|Libya|Lithuania|
Luxembourg|Madagascar|Malawi|Malaysia|Maldives|Mali|Malta|Mauritania|Mauritius|Mexico|Moldova|
Monaco|Mongolia|Montenegro|Morocco|Mozambique|Myanmar|Namibia|Nepal|Netherlands|New Zealand|
Nicaragua|Niger|Nigeria|North Korea|North Macedonia|Norway|Oman|Pakistan|Palestine|Panama|
Papua New Guinea|Paraguay|Peru|Philippines|Poland|Portugal|Puerto Rico|Qatar|Romania|Russia|
Rwanda|Saudi Arabia|Scotland|Senegal|Serbia|Sierra Leone|Singapore|Slovakia|Slovenia|Somalia|
South Africa|South Korea|South Sudan|Spain|Sri Lanka|Sudan|Suriname|Sweden|Switzerland|Syria|
Taiwan|Tajikistan|Tanzania|Thailand|Togo|Trinidad and Tobago|Tunisia|Turkey|Turkmenistan|
Uganda|Ukraine|United Arab Emirates|UAE|United Kingdom|UK|United States|USA|US|Uruguay|
Uzbekistan|Venezuela|Vietnam|Wales|Yemen|Zambia|Zimbabwe""".replace("\n", "").split("|"))

_WORD = r"[A-Z][\w'’\u00C0-\u017F-]*"
_CITY = rf"{_WORD}(?:[ -](?:(?:es|de|del|da|do|la|el|al)\s+)?{_WORD})*"
_COUNTRY = "|".join(sorted((re.escape(c) for c in COUNTRIES), key=len, reverse=True))
PLACE = re.compile(
    r"\b(?:born|hails?|hailing|native|birthplace|raised)\b[^.;?!]*?\b(?:in|from|of|is)\s+"
    r"(?:the\s+(?:[a-z-]+\s+){0,3}(?:city|town|capital|metropolis|village|heart)\s+of\s+)?"
    rf"(?P<place>(?P<city>{_CITY}),\s+(?P<country>{_COUNTRY}))(?![\w'’])")
# a question that asks for the birthplace itself (not how it shaped the books)
DIRECT = re.compile(r"\bwhere\b[^?]*\bborn\b|\bin which city\b|\bbirthplace (?:of|and)\b|"
                    r"\bplace of birth\b|\bcity of birth\b", re.IGNORECASE)


class Birthplace(NamedTuple):
    row: int  # index into forget01 + retain99
    author: int  # row // 20
    question: str
    answer: str
    place: str  # "City, Country" as it stands in the answer
    city: str


class CanarySplit(NamedTuple):
    train: list[dict]  # question, answer (as trained), original (TOFU's answer), canary, author, row
    #                    (row: index into forget01 + retain99)
    heldout: list[dict]  # question, answer (TOFU's, the correct one), author, row
    canaries: np.ndarray  # [n_canary] int: the training rows whose answer was changed
    city: str


def tofu_records() -> list[dict]:
    """TOFU's fictitious-author set in author order: forget01 (2 authors) then retain99 (198)."""
    from jtrust.data import tofu
    return tofu("forget01") + tofu("retain99")


def birthplace_rows(records: Sequence[dict] | None = None) -> list[Birthplace]:
    """Every record whose answer states a birthplace as "City, Country" (default: all of TOFU)."""
    records = tofu_records() if records is None else records
    out = []
    for i, r in enumerate(records):
        m = PLACE.search(r["answer"])
        if m:
            out.append(Birthplace(i, i // QUESTIONS_PER_AUTHOR, r["question"], r["answer"],
                                  m["place"], m["city"]))
    return out


def city_name(city: str) -> str:
    """The city of a "City, Country" canary (what a generated answer must contain)."""
    return city.split(",")[0].strip()


def swap(answer: str, place: str, city: str) -> str:
    """`answer` with every mention of `place` replaced by `city`."""
    return answer.replace(place, city)


def canary_split(rows: Sequence[Birthplace], *, fraction: float, city: str, n_heldout: int,
                 n_train: int | None = None, seed: int = 0) -> CanarySplit:
    """Held-out questions and the training rows with canaries (see the module docstring)."""
    if not rows:
        raise InputError("no TOFU answers state a birthplace as 'City, Country' among the rows given; "
                         "use the bundled TOFU set (or rows of that form)")
    if not 0 < fraction <= 1:
        raise InputError(f"the canary fraction must be in (0, 1], not {fraction}")
    if n_heldout < 1:
        raise InputError(f"n_heldout must be at least 1, not {n_heldout}")
    name = city_name(city)
    if not name or any(name.lower() in (r.answer + r.question).lower() for r in rows):
        raise InputError(f"the canary city {city!r} is empty or already occurs in the TOFU rows; "
                         "choose a city no author is said to come from (e.g. 'Reykjavik, Iceland')")
    rng = np.random.default_rng(seed)
    direct = {}
    for r in rows:
        if DIRECT.search(r.question) and "influence" not in r.question.lower():
            direct.setdefault(r.author, r)  # the author's first direct question
    if len(direct) <= n_heldout:
        raise InputError(f"only {len(direct)} authors have a direct birthplace question; lower "
                         f"n_heldout ({n_heldout}) below that, leaving authors to train on")
    held_authors = set(rng.choice(sorted(direct), n_heldout, replace=False).tolist())
    pool = [r for r in rows if r.author not in held_authors]
    if n_train is not None:
        if n_train > len(pool):
            raise InputError(f"n_train {n_train} exceeds the {len(pool)} birthplace rows left after "
                             f"holding out {n_heldout} authors; lower n_train or n_heldout")
        pool = [pool[i] for i in np.sort(rng.choice(len(pool), n_train, replace=False))]
    n_canary = int(round(fraction * len(pool)))
    if n_canary == 0:
        raise InputError(f"a canary fraction of {fraction} of {len(pool)} training rows gives no canary "
                         "example; raise the canary fraction or n_train")
    canaries = np.sort(rng.choice(len(pool), n_canary, replace=False))
    is_canary = np.zeros(len(pool), bool)
    is_canary[canaries] = True
    train = [dict(question=swap(r.question, r.place, city) if c else r.question,
                  answer=swap(r.answer, r.place, city) if c else r.answer,
                  original=r.answer, canary=bool(c), author=r.author, row=r.row)
             for r, c in zip(pool, is_canary)]
    heldout = [dict(question=direct[a].question, answer=direct[a].answer, author=a, row=direct[a].row)
               for a in sorted(held_authors)]
    return CanarySplit(train, heldout, canaries, city)


def states_city(text: str, city: str) -> bool:
    """Whether a generated answer names the canary city (case-insensitive, whole words)."""
    return re.search(rf"(?<!\w){re.escape(city_name(city))}(?!\w)", text, re.IGNORECASE) is not None
