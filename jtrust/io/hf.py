"""Read a Hugging Face checkpoint directory: config.json, weights and tokenizer files.

Weights come from the first of WEIGHT_FILES present (safetensors preferred,
sharded checkpoints through their index). Pickled PyTorch files are read only
with `torch.load(weights_only=True)`; anything that needs real unpickling is
refused. Every tensor is returned as float32 numpy (bf16/fp16 upcast).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import tokenizers
from safetensors import SafetensorError, safe_open

from jtrust.core.errors import InputError, MissingInput
from jtrust.io.raw import RawCheckpoint, check_finite, stop_ids
from jtrust.models.config import ModelConfig, config_from_hf
from jtrust.models.tokenizer import Tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_hf_dir(path) -> RawCheckpoint:
    """Read `path` (a `save_pretrained` directory) into a RawCheckpoint.

    The config is checked first (`config_from_hf`), then every tensor is read and checked to
    be finite. Raises `MissingInput` (a FileNotFoundError) or `InputError` (a ValueError)
    naming the missing or unreadable file.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise MissingInput(f"{path}: no such checkpoint directory; pass a directory written by "
                           "save_pretrained (config.json, weights, tokenizer.json)")
    config = _read_config(path / "config.json")
    return RawCheckpoint(config, _read_weights(path), _read_tokenizer(path, config))


def read_hf_tokenizer(path) -> Tokenizer:
    """The tokenizer of a Hugging Face directory (tokenizer.json with the config's special tokens)."""
    path = pathlib.Path(path)
    return _read_tokenizer(path, _read_config(path / "config.json"))


def read_hf_config(path) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face `config.json` (the file, or the directory holding it).

    Raises `MissingInput` when there is none and `InputError` naming the file and the key for
    one that is not JSON, lacks a key, has a value of the wrong type or describes an
    unsupported or inconsistent model.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingInput(f"{path}: no such config.json or checkpoint directory; check the path")
    file = path / "config.json" if path.is_dir() else path
    return config_from_hf(_read_config(file), source=file)


def _read_config(file: pathlib.Path) -> dict:
    config = _read_json(file)
    if config is None:
        raise MissingInput(f"{file}: missing; a Hugging Face checkpoint directory needs the "
                           "config.json its model was saved with")
    config_from_hf(config, source=file)  # fail here, before reading gigabytes of weights
    return config


def _read_weights(path: pathlib.Path) -> dict[str, np.ndarray]:
    candidates = [path / name for name in WEIGHT_FILES] + sorted(path.glob("*.pt"))
    for file in candidates:
        if file.is_file():
            return _read_index(file) if file.name.endswith(".index.json") else _read_file(file)
    raise MissingInput(f"{path}: no weights found; expected one of {list(WEIGHT_FILES)} or a "
                       "*.pt file")


def _read_index(index_file: pathlib.Path) -> dict[str, np.ndarray]:
    """All shards a `*.index.json` names in its weight_map, each holding the tensors it should."""
    weight_map, shards = index_shards(index_file)
    tensors = {}
    for shard in shards:
        tensors.update(_read_file(shard))
    absent = [(n, s) for n, s in weight_map.items() if n not in tensors]
    if absent:
        name, shard = absent[0]
        raise InputError(f"{index_file.parent / shard}: lacks tensor {name!r}, which "
                         f"{index_file.name} places there ({len(absent)} listed tensors are absent); "
                         "the shards do not match the index: download them again")
    return tensors


def index_shards(index_file: pathlib.Path) -> tuple[dict[str, str], list[pathlib.Path]]:
    """(weight_map, shard paths) of a `*.index.json`, checked: a weight_map object of plain file
    names, every shard present."""
    index = _read_json(index_file, expect="an object with a 'weight_map'")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_file}: no 'weight_map' object (tensor name -> shard file) in this "
                         "index; the file is corrupt: download it again")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or pathlib.PurePath(shard).name != shard \
                or shard in (".", ".."):
            raise InputError(f"{index_file}: weight_map[{name!r}] is {shard!r}, expected the file "
                             "name of a shard in the same directory; the index is corrupt")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index_file.parent / s).is_file()]
    if missing:
        raise MissingInput(f"{index_file.parent / missing[0]}: shard named in {index_file.name} "
                           f"is missing ({len(missing)} of {len(shards)} shards are); download "
                           "every shard the index lists")
    return weight_map, [index_file.parent / shard for shard in shards]


def _read_file(file: pathlib.Path) -> dict[str, np.ndarray]:
    return read_safetensors(file) if file.suffix == ".safetensors" else _read_torch(file)


def read_safetensors(file) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as float32 numpy, each checked to be finite.

    Raises `MissingInput` or `InputError` naming the file (and the tensor) for a missing,
    truncated or corrupt file, a tensor of a non-numeric dtype or one holding NaN/inf.
    """
    file = pathlib.Path(file)
    if not file.is_file():
        raise MissingInput(f"{file}: no such safetensors file")
    try:
        # the numpy framework cannot represent bfloat16; the flax one can (via ml_dtypes)
        with safe_open(file, framework="flax") as f:
            names = list(f.keys())
            tensors = {}
            for name in names:
                try:
                    tensors[name] = np.asarray(f.get_tensor(name), np.float32)
                except (TypeError, ValueError) as err:  # bool, complex, string... dtypes
                    raise InputError(f"{file}: tensor {name!r} cannot be read as float32 "
                                     f"({type(err).__name__}: {err}); jtrust reads float and "
                                     "integer tensors only") from None
    except (SafetensorError, OSError) as err:
        raise InputError(f"{file}: unreadable safetensors file ({_first_line(err)}); it is "
                         "probably truncated or corrupt: download or copy it again") from None
    for name, w in tensors.items():
        check_finite(w, name, file)
    return tensors


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _read_torch(file: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch  # only pickled checkpoints need it
    except ImportError as err:
        raise InputError(f"{file}: reading a PyTorch pickle needs torch (pip install torch), or "
                         "convert the checkpoint to safetensors") from err
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files; its advice is not ours
        refused = _UNSAFE_GLOBAL.search(str(err))
        if refused:  # torch's message suggests weights_only=False: never repeat that advice
            raise InputError(
                f"{file}: refused: the pickle holds a {refused.group(1)} object, not only tensors; "
                "jtrust never unpickles untrusted files (torch.load(weights_only=True) only). "
                "Convert the checkpoint to safetensors in an environment you trust "
                "(model.save_pretrained(dir, safe_serialization=True))") from None
        raise InputError(f"{file}: unreadable PyTorch checkpoint ({type(err).__name__}); it is "
                         "truncated, corrupt or not a torch.save file, and jtrust never unpickles "
                         "anything but tensors: download it again or convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(f"{file}: not a flat state dict of tensors; save model.state_dict() or use "
                         "safetensors")
    tensors = {}
    for name, t in state.items():
        if t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"{file}: tensor {name!r} has dtype {t.dtype}; jtrust reads float "
                             "and integer tensors only")
        tensors[name] = t.detach().to(torch.float32).numpy()
        check_finite(tensors[name], name, file)
    return tensors


_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _read_tokenizer(path: pathlib.Path, config: dict) -> Tokenizer:
    """tokenizer.json plus the special tokens, BOS rule and chat template from the config files."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise MissingInput(f"{file}: missing; jtrust needs the fast-tokenizer file. Write it with "
                           "transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust library raises a bare Exception for every parse error
        raise InputError(f"{file}: unreadable tokenizer ({_first_line(err)}); download or copy it "
                         "again") from None
    backend.no_padding()  # jtrust pads batches itself; some tokenizer.json files carry settings
    backend.no_truncation()
    settings = _read_json(path / "tokenizer_config.json", expect="an object") or {}
    special_map = _read_json(path / "special_tokens_map.json", expect="an object") or {}

    def token_id(role):
        key = f"{role}_token"
        token, source = (settings.get(key), "tokenizer_config.json") if settings.get(key) else \
            (special_map.get(key), "special_tokens_map.json")
        if isinstance(token, dict):  # AddedToken serialised as {"content": ..., ...}
            token = token.get("content")
        if not token:
            ids = _ids(config.get(f"{role}_token_id"), path / "config.json", f"{role}_token_id")
            return ids[0] if ids else None
        if not isinstance(token, str):
            raise InputError(f"{path / source}: {key} is {token!r}, expected the token's text "
                             "(a string) or {\"content\": text}")
        i = backend.token_to_id(token)
        if i is None:
            raise InputError(f"{path}: {role}_token {token!r} from the tokenizer files is not in "
                             f"{file.name}'s vocabulary")
        return i

    bos, eos, pad = token_id("bos"), token_id("eos"), token_id("pad")
    add_bos = settings.get("add_bos_token")
    if add_bos is None:  # no explicit rule: do what tokenizer.json's post-processor does
        add_bos = bos is not None and backend.encode("a").ids[:1] == [bos]
    template_file = path / "chat_template.jinja"
    template = _read_text(template_file) if template_file.is_file() else settings.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        if not all(isinstance(t, dict) and "name" in t and "template" in t for t in template):
            raise InputError(f"{path / 'tokenizer_config.json'}: chat_template is a list whose "
                             "entries are not all {\"name\": ..., \"template\": ...}")
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template is not None and not isinstance(template, str):
        raise InputError(f"{path / 'tokenizer_config.json'}: chat_template is {type(template).__name__},"
                         " expected a Jinja template string")
    generation = _read_json(path / "generation_config.json", expect="an object") or {}
    ends = [eos, *_ids(config.get("eos_token_id"), path / "config.json", "eos_token_id"),
            *_ids(generation.get("eos_token_id"), path / "generation_config.json", "eos_token_id")]
    return Tokenizer(backend=backend, bos_id=bos, eos_id=eos,
                     pad_id=pad if pad is not None else (eos if eos is not None else 0),
                     add_bos=bool(add_bos), chat_template=template,
                     stop_ids=stop_ids(backend, ends))


def _read_text(file: pathlib.Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{file}: not UTF-8 text (byte offset {err.start}); the file is corrupt: "
                         "download it again or re-save it as UTF-8") from None
    except OSError as err:
        raise InputError(f"{file}: cannot read it ({err.strerror or err})") from None


def _read_json(file: pathlib.Path, expect: str | None = None):
    """The parsed file, or None when it does not exist; with `expect`, it must be a JSON object."""
    if not file.is_file():
        return None
    try:
        value = json.loads(_read_text(file))
    except json.JSONDecodeError as err:
        raise InputError(f"{file}: not valid JSON ({err}); the file is truncated or corrupt") from None
    except (ValueError, RecursionError) as err:  # huge integers, absurd nesting
        raise InputError(f"{file}: unreadable JSON ({type(err).__name__}); the file is corrupt") from None
    if expect is not None and not isinstance(value, dict):
        raise InputError(f"{file}: holds a JSON {type(value).__name__}, expected {expect}; the file "
                         "is corrupt")
    return value


def _ids(x, file: pathlib.Path, key: str) -> list[int]:
    """A token id or list of them (None: none), each an integer."""
    ids = [] if x is None else x if isinstance(x, list) else [x]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError(f"{file}: {key} is {x!r}, expected a token id (an integer) or a list of them")
    return ids
