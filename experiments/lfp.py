"""Learned feedback patterns on the embedded model (issue 14): see jtrust/pipelines/lfp.py.

    python experiments/lfp.py --config experiments/configs/lfp_smollm2.json      # sentiment, small budget
    python experiments/lfp.py --config experiments/configs/lfp_hh_smollm2.json   # preference (DPO)
    python experiments/lfp.py --config experiments/configs/lfp_paper.json        # the paper's scale
"""

import sys

from jtrust.pipelines.lfp import main

if __name__ == "__main__":
    sys.exit(main())
