"""Text <-> token ids, with the checkpoint's special tokens and chat template."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Iterable

import jinja2
import numpy as np
import tokenizers

from jtrust.core.errors import InputError


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    backend: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    add_bos: bool = False
    chat_template: str | None = None
    stop_ids: tuple[int, ...] = ()  # end-of-sequence / end-of-turn ids that end generation

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def chat(self, user_message: str, system: str | None = None) -> str:
        """The prompt text for one user turn, rendered with the checkpoint's chat template."""
        if not self.chat_template:
            raise InputError("this checkpoint has no chat template; pass plain prompts instead")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message}]
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True,
            bos_token=self._token(self.bos_id), eos_token=self._token(self.eos_id))

    def pad_batch(self, texts: list[str], length: int | None = None, side: str = "right",
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask [B, T] (T = longest or `length`), padded on `side`."""
        return pad([self.encode(t) for t in texts], self.pad_id, length, side)

    def _token(self, i):
        return "" if i is None else self.backend.id_to_token(i)

    def to_files(self) -> dict[str, str]:
        """What `save` writes beside a checkpoint: tokenizer.json and jtrust_tokenizer.json."""
        meta = dict(bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id, add_bos=self.add_bos,
                    chat_template=self.chat_template, stop_ids=list(self.stop_ids))
        return {"tokenizer.json": self.backend.to_str(), "jtrust_tokenizer.json": json.dumps(meta, indent=2)}

    @classmethod
    def from_dir(cls, directory) -> "Tokenizer":
        """The tokenizer `to_files` wrote into a directory."""
        d = pathlib.Path(directory)
        return cls.from_files((d / "tokenizer.json").read_text(), (d / "jtrust_tokenizer.json").read_text())

    @classmethod
    def from_files(cls, tokenizer_json: str, meta_json: str) -> "Tokenizer":
        meta = json.loads(meta_json)
        meta["stop_ids"] = tuple(meta.get("stop_ids", ()))
        return cls(backend=tokenizers.Tokenizer.from_str(tokenizer_json), **meta)


def train_bpe(texts: Iterable[str], vocab_size: int, lowercase: bool = True) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `texts` (Hugging Face `tokenizers`), for models
    trained from scratch. Id 0 is <|endoftext|>: document separator, stop and padding token.
    `lowercase` folds every input to lower case first (for models trained on lowercased text).
    Any text can be encoded: unseen characters fall back to bytes."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    backend = tokenizers.Tokenizer(models.BPE())
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, bos_id=0, eos_id=0, pad_id=0, stop_ids=(0,))


def pad(sequences: list[list[int]], pad_id: int, length: int | None = None, side: str = "right",
        ) -> tuple[np.ndarray, np.ndarray]:
    """Pad id lists into ids and mask [B, T]; sequences longer than `length` are an error."""
    if side not in ("left", "right"):
        raise InputError(f"side must be 'left' or 'right', not {side!r}")
    longest = max((len(s) for s in sequences), default=0)
    T = longest if length is None else length
    if longest > T:
        raise InputError(f"a sequence has {longest} tokens, more than the padded length {T}")
    ids = np.full((len(sequences), T), pad_id, np.int32)
    mask = np.zeros((len(sequences), T), np.int32)
    for b, s in enumerate(sequences):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[b, sl] = s
        mask[b, sl] = 1
    return ids, mask
