"""Ray job entrypoint for a hyperparameter search, with the same flags as `fusionrec tune`:

    ray job submit --working-dir . -- python jobs/tune.py DATASET --features FEATURES --space tune/widths.yaml

Inside a Ray job RAY_ADDRESS is set, so the trials spread over that cluster's nodes.
"""

import sys

from fusionrec.cli import run

if __name__ == "__main__":
    run(["tune", *sys.argv[1:]])
