"""The command line every config-driven experiment shares: --config FILE (JSON), --out, --model."""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Callable


def experiment_args(doc: str, default_config: str, argv=None, *, model: bool = True,
                    extra: Callable[[argparse.ArgumentParser], None] | None = None,
                    ) -> tuple[argparse.Namespace, dict, pathlib.Path]:
    """(parsed flags, the config's contents, the output directory: --out or the config's "out")."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help="a JSON experiment config")
    if model:
        parser.add_argument("--model", default=None, help="overrides the config's model spec")
    parser.add_argument("--out", default=None, help="overrides the config's output directory")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    path = pathlib.Path(args.config)
    if not path.is_file():
        parser.error(f"--config {path}: no such file (the configs live in experiments/configs/)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        parser.error(f"--config {path}: not valid JSON ({e})")
    return args, cfg, pathlib.Path(args.out or cfg["out"])
