"""Read a Hugging Face checkpoint directory: config.json, weights and tokenizer files.

Weights come from the first of WEIGHT_FILES present (safetensors preferred,
sharded checkpoints through their index). Pickled PyTorch files are read only
with `torch.load(weights_only=True)`; anything that needs real unpickling is
refused. Every tensor is returned as float32 numpy (bf16/fp16 upcast).
"""

from __future__ import annotations

import json
import pathlib
import pickle

import numpy as np
import tokenizers
from safetensors import SafetensorError, safe_open

from jtrust.io.raw import RawCheckpoint, stop_ids
from jtrust.models.tokenizer import Tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_hf_dir(path) -> RawCheckpoint:
    """Read `path` (a `save_pretrained` directory) into a RawCheckpoint.

    Raises FileNotFoundError or ValueError naming the missing or unreadable file.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory; pass a directory written by "
                                "save_pretrained (config.json, weights, tokenizer.json)")
    config = _read_json(path / "config.json")
    if config is None:
        raise FileNotFoundError(f"{path / 'config.json'}: missing; a Hugging Face checkpoint "
                                "directory needs the config.json its model was saved with")
    return RawCheckpoint(config, _read_weights(path), _read_tokenizer(path, config))


def _read_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
    candidates = [path / name for name in WEIGHT_FILES] + sorted(path.glob("*.pt"))
    for file in candidates:
        if file.is_file():
            return _read_index(file) if file.name.endswith(".index.json") else _read_file(file)
    raise FileNotFoundError(f"{path}: no weights found; expected one of {list(WEIGHT_FILES)} or a "
                            "*.pt file")


def _read_index(index_file: pathlib.Path) -> dict[str, np.ndarray]:
    """All shards a `*.index.json` names in its weight_map."""
    weight_map = (_read_json(index_file) or {}).get("weight_map")
    if not weight_map:
        raise ValueError(f"{index_file}: no 'weight_map' in this index; the file is corrupt")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_file.parent / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index_file.parent / missing[0]}: shard named in {index_file.name} "
                                f"is missing ({len(missing)} of {len(shards)} shards are); download "
                                "every shard the index lists")
    tensors = {}
    for shard in shards:
        tensors.update(_read_file(index_file.parent / shard))
    return tensors


def _read_file(file: pathlib.Path) -> dict[str, np.ndarray]:
    return _read_safetensors(file) if file.suffix == ".safetensors" else _read_torch(file)


def _read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        # the numpy framework cannot represent bfloat16; the flax one can (via ml_dtypes)
        with safe_open(file, framework="flax") as f:
            return {name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{file}: unreadable safetensors file ({err}); it is probably truncated or "
                         "corrupt: download or copy it again") from err


def _read_torch(file: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch  # only pickled checkpoints need it
    except ImportError as err:
        raise ValueError(f"{file}: reading a PyTorch pickle needs torch (pip install torch), or "
                         "convert the checkpoint to safetensors") from err
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        raise ValueError(f"{file}: refused: torch.load(weights_only=True) cannot read it ({err}). "
                         "jtrust never unpickles arbitrary objects; convert the checkpoint to "
                         "safetensors in an environment you trust") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: not a flat state dict of tensors; save model.state_dict() or use "
                         "safetensors")
    return {name: t.detach().to(torch.float32).numpy() for name, t in state.items()}


def _read_tokenizer(path: pathlib.Path, config: dict) -> Tokenizer:
    """tokenizer.json plus the special tokens, BOS rule and chat template from the config files."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; jtrust needs the fast-tokenizer file. Write it with "
                                "transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust library raises a bare Exception for every parse error
        raise ValueError(f"{file}: unreadable tokenizer ({err}); download or copy it again") from err
    backend.no_padding()  # jtrust pads batches itself; some tokenizer.json files carry settings
    backend.no_truncation()
    settings = _read_json(path / "tokenizer_config.json") or {}
    special_map = _read_json(path / "special_tokens_map.json") or {}

    def token_id(role):
        token = settings.get(f"{role}_token") or special_map.get(f"{role}_token")
        if isinstance(token, dict):  # AddedToken serialised as {"content": ..., ...}
            token = token["content"]
        if token is None:
            ids = _as_list(config.get(f"{role}_token_id"))
            return ids[0] if ids else None
        i = backend.token_to_id(token)
        if i is None:
            raise ValueError(f"{path}: {role}_token {token!r} from the tokenizer files is not in "
                             f"{file.name}'s vocabulary")
        return i

    bos, eos, pad = token_id("bos"), token_id("eos"), token_id("pad")
    add_bos = settings.get("add_bos_token")
    if add_bos is None:  # no explicit rule: do what tokenizer.json's post-processor does
        add_bos = bos is not None and backend.encode("a").ids[:1] == [bos]
    template_file = path / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else settings.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    generation = _read_json(path / "generation_config.json") or {}
    ends = [eos, *_as_list(config.get("eos_token_id")), *_as_list(generation.get("eos_token_id"))]
    return Tokenizer(backend=backend, bos_id=bos, eos_id=eos,
                     pad_id=pad if pad is not None else (eos if eos is not None else 0),
                     add_bos=bool(add_bos), chat_template=template,
                     stop_ids=stop_ids(backend, ends))


def _read_json(file: pathlib.Path) -> dict | None:
    """The parsed file, or None when it does not exist."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err}); the file is truncated or corrupt") from err


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, list) else [x]
