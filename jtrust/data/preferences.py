"""Preference pairs: Anthropic's HH-RLHF harmless-base test split (bundled, MIT; see
LICENSES/NOTICE.md) or a user's file in the same format.

An HH-RLHF row is {"chosen": dialogue, "rejected": dialogue}: two copies of one conversation
("\\n\\nHuman: ...\\n\\nAssistant: ...") that differ only in the last assistant reply.
`read_pairs` splits each row into a `PreferencePair`:

    prompt   = the shared text through the last "\\n\\nAssistant:" (ends with "Assistant:")
    chosen   = the preferred last reply (its leading space kept: " Sure, ...")
    rejected = the other last reply

and drops, counting each reason, rows whose two prompts differ (the dialogues diverge before
the last reply: 5 rows of the bundled file), rows with an empty reply (4) and rows whose replies
are equal (none): the bundled file gives 2303 of its 2312 rows. `split_pairs` holds out a
seeded fraction of prompts (a repeated prompt stays on one side).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import NamedTuple, Sequence

import numpy as np

from jtrust.core import store
from jtrust.core.errors import InputError, MissingInput
from jtrust.data import BUNDLED
from jtrust.data.files import kind, located_rows, read_bytes

HH_RLHF = "hh_rlhf/harmless-base_test.jsonl.gz"  # 2312 rows; 2303 pairs after the drops above
ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
DROP_REASONS = ("prompts differ", "empty reply", "equal replies")


class PreferencePair(NamedTuple):
    prompt: str  # the dialogue through the last "\n\nAssistant:"
    chosen: str  # the preferred reply
    rejected: str


class PreferencePairs(NamedTuple):
    name: str  # "hh_rlhf" or the file's name
    pairs: list[PreferencePair]  # in file order
    rows: np.ndarray  # [len(pairs)] int: the 0-based row of each pair in the file
    dropped: dict[str, int]  # reason -> rows dropped (DROP_REASONS)
    sha256: str  # of the file's bytes


class PreferenceSplit(NamedTuple):
    train: list[PreferencePair]
    heldout: list[PreferencePair]


def split_dialogue(chosen: str, rejected: str) -> PreferencePair | str:
    """One HH-RLHF row as (prompt, chosen reply, rejected reply), or the reason to drop it
    (one of DROP_REASONS). Both texts must contain "\\n\\nAssistant:"."""
    cut_c, cut_r = chosen.rfind(ASSISTANT) + len(ASSISTANT), rejected.rfind(ASSISTANT) + len(ASSISTANT)
    prompt, reply_c, reply_r = chosen[:cut_c], chosen[cut_c:], rejected[cut_r:]
    if prompt != rejected[:cut_r]:
        return DROP_REASONS[0]
    if not reply_c.strip() or not reply_r.strip():
        return DROP_REASONS[1]
    if reply_c == reply_r:
        return DROP_REASONS[2]
    return PreferencePair(prompt, reply_c, reply_r)


def read_pairs(path: str | os.PathLike | None = None) -> PreferencePairs:
    """The preference pairs of the bundled HH-RLHF harmless-base test file (path None,
    checksum-verified) or of a user's .jsonl / .json / .jsonl.gz file of {"chosen", "rejected"}
    dialogues in HH-RLHF's format. Raises InputError naming the file (and line) for a file
    that is empty, not JSON lines, lacks the fields, or holds no usable pair."""
    if path is None:
        path = BUNDLED / HH_RLHF
        store.verified_sha256(path)
        name = "hh_rlhf"
    else:
        path = pathlib.Path(path).expanduser()
        if not path.is_file():
            raise MissingInput(f"no preference file at {path}; pass a .jsonl (or .jsonl.gz) file of "
                               '{"chosen": ..., "rejected": ...} dialogues, or None for the bundled HH-RLHF')
        name = path.name
    data = read_bytes(path)
    rows = located_rows(path, data)
    if not rows:
        raise InputError(f"{path}: the file holds no rows; expected one "
                         '{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...} per line')
    pairs, kept, dropped = [], [], dict.fromkeys(DROP_REASONS, 0)
    for i, row in enumerate(rows):
        texts = []
        for field in ("chosen", "rejected"):
            value = row.fields.get(field)
            if not isinstance(value, str):
                raise InputError(f"{path}: {row.where}: {field!r} is "
                                 f"{'missing' if value is None else kind(value)}, expected the dialogue "
                                 'as a string; each row needs "chosen" and "rejected" dialogues')
            if ASSISTANT not in value:
                raise InputError(f"{path}: {row.where}: the {field!r} dialogue has no "
                                 f"{ASSISTANT.strip()!r} turn; HH-RLHF dialogues read "
                                 '"\\n\\nHuman: ...\\n\\nAssistant: ..."')
            texts.append(value)
        pair = split_dialogue(*texts)
        if isinstance(pair, str):
            dropped[pair] += 1
            continue
        pairs.append(pair)
        kept.append(i)
    if not pairs:
        raise InputError(f"{path}: none of its {len(rows)} rows is a usable pair ({dropped}); the "
                         "chosen and rejected dialogues must share everything up to the last "
                         "assistant reply and differ in that reply")
    return PreferencePairs(name, pairs, np.array(kept, np.int64), dropped, hashlib.sha256(data).hexdigest())


def split_pairs(pairs: Sequence[PreferencePair], heldout: float | int = 0.1, seed: int = 0,
                ) -> PreferenceSplit:
    """(train, held-out) pairs, each in input order: a seeded permutation of the distinct
    prompts, the first `heldout` of them (a fraction in (0, 1), or a count) held out, so pairs
    that share a prompt never straddle the split."""
    prompts = sorted({p.prompt for p in pairs})
    n = int(round(heldout * len(prompts))) if isinstance(heldout, float) else int(heldout)
    if isinstance(heldout, float) and not 0 < heldout < 1 or not 0 < n < len(prompts):
        raise InputError(f"heldout={heldout} holds out {n} of {len(prompts)} prompts; give a fraction "
                         "in (0, 1) or a count that leaves prompts on both sides")
    held = {prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))[:n]}
    return PreferenceSplit([p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held])
