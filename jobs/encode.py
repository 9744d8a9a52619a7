"""Ray job entrypoint for encoding, with the same flags as `fusionrec encode`:

    ray job submit --working-dir . -- python jobs/encode.py DATASET --out FEATURES [--actors N ...]

Inside a Ray job RAY_ADDRESS is set, so the pipeline joins that cluster instead of starting one.
"""

import sys

from fusionrec.cli import run

if __name__ == "__main__":
    run(["encode", *sys.argv[1:]])
