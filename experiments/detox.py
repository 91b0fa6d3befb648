"""Detoxification methods compared on the embedded model (issue 15): see jtrust/pipelines/detox.py.

    python experiments/detox.py --config experiments/configs/detox_smollm2.json
"""

import sys

from jtrust.pipelines.detox import main

if __name__ == "__main__":
    sys.exit(main())
