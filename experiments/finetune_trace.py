"""LoRA fine-tuning of the embedded model, traced over its checkpoints.

The run lives in `jtrust.pipelines.finetune_trace` (its docstring gives the whole method); this script
is its command line, e.g. `python experiments/finetune_trace.py --config experiments/configs/<file>.json`.
"""

import sys

from jtrust.pipelines.finetune_trace import main

if __name__ == "__main__":
    sys.exit(main())
