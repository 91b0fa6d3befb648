"""A sweep of analyses split over workers that share a directory: see jtrust/pipelines/sweep.py.

    python experiments/sweep.py --config experiments/configs/sweep_example.json                 # one worker, then merge
    python experiments/sweep.py --config experiments/configs/sweep_example.json --worker 0 --workers 2
    python experiments/sweep.py --config experiments/configs/sweep_example.json --merge
"""

import sys

from jtrust.cli import main

if __name__ == "__main__":
    main(["sweep", *sys.argv[1:]])
