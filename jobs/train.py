"""Ray job entrypoint for training, with the same flags as `fusionrec train`:

    ray job submit --working-dir . -- python jobs/train.py DATASET --features FEATURES --workers 2 --register

Inside a Ray job RAY_ADDRESS is set, so the TorchTrainer runs its workers on that cluster.
"""

import sys

from fusionrec.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
