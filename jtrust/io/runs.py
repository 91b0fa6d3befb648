"""The directory a training run writes, and reading a language-model run back as a series.

Layout (any parameter pytree; the language-model files are added by `jtrust.training.lm`):
  jtrust_run.json             the run's identity (what is trained, on what, how): a rerun into
                              the same directory resumes only if every entry matches
  metrics.jsonl               one JSON object per logged step or evaluation
  checkpoints/<step>/state    step, trainable pytree, optimizer state: what resume reads
  checkpoints/<step>/params   a language model's full parameters: what `jtrust.load` reads
  tokenizer.json, jtrust_tokenizer.json   (language-model runs)
  .jtrust.lock                 while a run trains into the directory (`jtrust.core.store.lock_dir`,
                              taken by `jtrust.training.fit`): one writer at a time
Orbax writes a step under a temporary name and renames it to the bare number once complete,
so `run_steps` lists only finished checkpoints. Directories are created with the ordinary
modes (the umask applies), orbax's included.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable

import jax

from jtrust.core import store
from jtrust.core.errors import InputError, MissingInput
from jtrust.core.store import content_hash
from jtrust.io.params import restore_params
from jtrust.models.config import ModelConfig
from jtrust.models.model import Checkpoint, Model, Series
from jtrust.models.tokenizer import Tokenizer

RUN_MARKER = "jtrust_run.json"  # present in every directory a training run writes
METRICS = "metrics.jsonl"


def start_run(out: pathlib.Path, manifest: dict, files: dict[str, str] | None = None) -> None:
    """Begin a run in `out` (its `files` first, the manifest last: its presence means "a run"),
    or check that `out` already holds this very run (every manifest entry equal). The caller
    holds `out`'s lock (`jtrust.core.store.lock_dir`)."""
    marker = out / RUN_MARKER
    if jax.process_index() != 0:  # process 0 writes; orbax coordinates the checkpoints itself
        return
    if marker.exists():
        stored = json.loads(marker.read_text())
        keys = sorted((set(stored) | set(manifest)) - {"format"})
        for diff in store.identity_diff(stored, manifest, keys):
            key = diff.split(":")[0]
            raise InputError(f"{out} holds a run with another {key.replace('_', ' ')} ({diff}); resume "
                             "it with the same settings, or choose another output directory")
        return
    out.mkdir(parents=True, exist_ok=True)
    for fname, text in (files or {}).items():
        store.write_text(out / fname, text)
    store.write_json(marker, manifest, indent=2)


def checkpoint_manager(out: pathlib.Path, save_steps: Iterable[int]):
    """An orbax manager that keeps exactly `save_steps` under out/checkpoints."""
    import orbax.checkpoint as ocp
    return ocp.CheckpointManager(
        (out / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.SpecificStepsPolicy(set(save_steps)),
            cleanup_tmp_directories=True, max_to_keep=None, create=True))


def read_metrics(out: pathlib.Path) -> list[dict]:
    path = out / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            pass
    return records


def write_metrics(out: pathlib.Path, records: list[dict]) -> None:
    if jax.process_index() == 0:
        store.write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in records))


def append_metric(out: pathlib.Path, record: dict) -> None:
    if jax.process_index() == 0:
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")


def run_steps(root: pathlib.Path) -> list[int]:
    """The finished checkpoints of a training run, in step order."""
    ckpts = root / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def read_run_checkpoint(root: pathlib.Path, step: int) -> Model:
    """One step of a language-model training run as a Model named "step<N>"."""
    manifest = json.loads((root / RUN_MARKER).read_text())
    if "model_config" not in manifest:
        raise InputError(f"{root} is a training run of a parameter pytree, not of a language model; "
                         "read its states with jtrust.training.restore_state")
    config = ModelConfig.from_dict(manifest["model_config"], source=root / RUN_MARKER)
    tokenizer = Tokenizer.from_dir(root)
    params_dir = root / "checkpoints" / str(step) / "params"
    if not params_dir.is_dir():
        raise MissingInput(f"{params_dir} is missing: step {step} of {root} was not saved "
                                f"(saved steps: {run_steps(root)})")
    params = restore_params(params_dir, config, root / RUN_MARKER)
    return Model(config, params, tokenizer, name=f"step{step}", checkpoint_hash=content_hash(params_dir))


def run_series(root: pathlib.Path) -> Series:
    steps = run_steps(root)
    if not steps:
        raise InputError(f"{root} is a training run without finished checkpoints yet")
    return Series(name=str(root), checkpoints=tuple(
        Checkpoint(name=f"step{s}", step=s, load=lambda s=s: read_run_checkpoint(root, s)) for s in steps))


def restore_state(root: str | os.PathLike, step: int, like: Any) -> Any:
    """The training state saved at `step` of any run, shaped like the pytree `like`."""
    import orbax.checkpoint as ocp
    root = pathlib.Path(root)
    manager = checkpoint_manager(root, [step])
    try:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    finally:
        manager.close()
