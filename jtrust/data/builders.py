"""The five bundled trust sets as tensorflow-datasets builders, stored as array_record.

`trust_data_source("toxicity")` prepares the set once (from the bundled CSV, offline) and
returns a random-access sequence: `len(ds)` rows, `ds[i]` (an int, not a slice) =
{"text": bytes (UTF-8), "label": int, "index": int}, in file order; `ds.__getitems__(indices)`
reads a batch. Reading needs no TensorFlow (tfds decodes with numpy when TF is absent).
The rows are `load_texts(dimension)`'s rows: same cleaning, same checksum check.

Prepared files live under `$JTRUST_CACHE/tfds` (default ~/.cache/jtrust/tfds) as
jtrust_trust_sets/<dimension>/1.0.0/; preparing all five takes ~1.5 s and ~4 MB, once.
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jtrust.core.errors import InputError
from jtrust.data import TRUST_DATASETS, iter_examples
from jtrust.core.store import cache_root

_SOURCE = {  # dimension -> the benchmark the rows come from
    "reliability": "TruthfulQA (TracingLLM train split)",
    "toxicity": "ToxiGen",
    "privacy": "ConfAIde",
    "fairness": "stereoset (related vs unrelated)",
    "robustness": "SST-2 with case-flip perturbations",
}


def _description(dimension: str) -> str:
    path, one, zero = TRUST_DATASETS[dimension]
    text = (f"TracingLLM {dimension} set from {_SOURCE[dimension]}, bundled as jtrust/data/{path}. "
            f"label 1 = {one}, label 0 = {zero}. One split, 'train', holding every row in file "
            "order; split by row order downstream.")
    if dimension == "fairness":
        text += " Label 1 is the related continuation, 0 the unrelated one: it is not a stereotype detector."
    return text


class TrustSets(tfds.core.GeneratorBasedBuilder):
    """One config per trust dimension; rows come from `load_texts`, never downloaded."""

    name = "jtrust_trust_sets"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The five TracingLLM trust sets as bundled with jtrust."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=d, description=_description(d))
                       for d in TRUST_DATASETS]

    def _info(self) -> tfds.core.DatasetInfo:
        _, one, zero = TRUST_DATASETS[self.builder_config.name]
        return self.dataset_info_from_configs(
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=[zero, one]),  # name index == label
                "index": tfds.features.Scalar(dtype=np.int64, doc="row in the source file, from 0"),
            }),
            supervised_keys=("text", "label"),
            disable_shuffling=True,  # keep file order: the paper's 80/20 split is by row order
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        for example in iter_examples(self.builder_config.name):
            yield example["index"], example


def default_data_dir() -> pathlib.Path:
    return cache_root() / "tfds"


def trust_builder(dimension: str, data_dir: str | os.PathLike | None = None) -> TrustSets:
    """The builder for `dimension`, prepared as array_record under `data_dir` (reused if there)."""
    if dimension not in TRUST_DATASETS:
        raise InputError(f"unknown trust dimension {dimension!r}; valid: {sorted(TRUST_DATASETS)}")
    builder = TrustSets(config=dimension, data_dir=os.fspath(data_dir or default_data_dir()))
    # offline whatever tfds's global GCS switch says (4.9.10 has it off; older versions probed gs://)
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def trust_data_source(dimension: str, split: str = "train",
                      data_dir: str | os.PathLike | None = None) -> Sequence[dict]:
    """Random access to a prepared trust set: `len(ds)`, `ds[i]` -> {"text", "label", "index"}."""
    return trust_builder(dimension, data_dir).as_data_source(split=split)
