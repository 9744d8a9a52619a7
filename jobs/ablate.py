"""Ray job entrypoint for the ablation table, with the same flags as `fusionrec ablate`:

    ray job submit --working-dir . -- python jobs/ablate.py DATASET --features FEATURES --folds 5

Inside a Ray job RAY_ADDRESS is set, so the fits (Tune trials) spread over that cluster's nodes.
"""

import sys

from fusionrec.cli import run

if __name__ == "__main__":
    run(["ablate", *sys.argv[1:]])
