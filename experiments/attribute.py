"""Hallucination tracing: entity-swap canaries in TOFU, LoRA fine-tuning, attribution AUC.

The run lives in `jtrust.pipelines.attribute` (its docstring gives the whole method); this script
is its command line, e.g. `python experiments/attribute.py --config experiments/configs/<file>.json`
(the same run as `jtrust attribute`, whose flags are the config's "options").
"""

import sys

from jtrust.pipelines.attribute import main

if __name__ == "__main__":
    sys.exit(main())
