"""Pre-train a tiny model from scratch and trace its checkpoint series.

The run lives in `jtrust.pipelines.pretrain` (its docstring gives the whole method); this script
is its command line, e.g. `python experiments/pretrain.py --config experiments/configs/<file>.json`.
"""

import sys

from jtrust.pipelines.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
