"""What every checkpoint reader returns: a config dict, named float32 tensors and a tokenizer."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import tokenizers

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
