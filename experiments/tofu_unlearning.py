"""TOFU unlearning case study: greedy vs probabilistic evaluation.

The run lives in `jtrust.pipelines.tofu` (its docstring gives the whole method); this script
is its command line, e.g. `python experiments/tofu_unlearning.py --config experiments/configs/<file>.json`.
"""

import sys

from jtrust.pipelines.tofu import main

if __name__ == "__main__":
    sys.exit(main())
