"""What every checkpoint reader returns: a config dict, named float32 tensors and a tokenizer."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import tokenizers

from jtrust.core.errors import InputError
from jtrust.models.tokenizer import Tokenizer

END_OF_TURN = ("<|im_end|>", "<|eot_id|>")  # chat end-of-turn tokens that also end generation


class RawCheckpoint(NamedTuple):
    """A checkpoint in Hugging Face terms, before conversion to jtrust parameters.

    `jtrust.models.config.config_from_hf(hf_config)` and
    `jtrust.io.convert.hf_to_params(tensors, config)` turn it into a model.
    """

    hf_config: dict  # Hugging Face config.json style dict (model_type etc.)
    tensors: dict[str, np.ndarray]  # Hugging Face tensor names -> float32 arrays, torch layout [out, in]
    tokenizer: Tokenizer


def stop_ids(backend: tokenizers.Tokenizer, ids) -> tuple[int, ...]:
    """`ids` (None entries dropped) plus the END_OF_TURN tokens the vocabulary has, de-duplicated."""
    found = [backend.token_to_id(t) for t in END_OF_TURN]
    return tuple(dict.fromkeys(int(i) for i in [*ids, *found] if i is not None))


def check_finite(array: np.ndarray, name: str, source: str | os.PathLike) -> None:
    """Refuse a tensor holding NaN or inf (corrupt bytes, a diverged run) before it is converted
    and cached: InputError naming the tensor, the file and the first bad element."""
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        where = np.unravel_index(bad[0], array.shape) if array.ndim else ()
        raise InputError(f"{source}: tensor {name!r} holds {bad.size} non-finite values (NaN or inf;"
                         f" first {array.flat[bad[0]]} at index {tuple(int(i) for i in where)}); the "
                         "file is corrupt, or the weights diverged: download it again or use "
                         "another checkpoint")
