"""Synthetic-shop generation speed.

1. Image rendering: the same pictures rendered with 1 worker and with all cores; prints both
   images/s and the ratio (the parallel speed-up), measured in this run.
2. A million ratings (20,000 users x 10,000 items x 0.5 %), images skipped: wall time and
   ratings/s (the target is under a minute on 2 cores).

    .venv/bin/python benchmarks/synth.py [--users 20000 --items 10000 --density 0.005 --images 2000]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import typer

from fusionrec.data.shop_images import Picture, render_all
from fusionrec.data.synth import SynthConfig, generate


def main(users: int = 20_000, items: int = 10_000, density: float = 0.005, images: int = 2_000,
         image_size: int = 128) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cores = os.cpu_count() or 1
        warm_up = [Picture(Path(tmp) / "warm" / f"{k}.png", k % 6, k % 10, k % 6, False, (1, k)) for k in range(200)]
        render_all(warm_up, image_size, 1)  # first-use costs (imports, caches) out of the timed runs
        rates = {}
        for workers in (1, cores):
            folder = Path(tmp) / f"images-{workers}"
            pictures = [Picture(folder / f"{k}.png", k % 6, k % 10, k % 6, k % 2 == 0, (0, k)) for k in range(images)]
            start = time.perf_counter()
            render_all(pictures, image_size, workers)
            rates[workers] = images / (time.perf_counter() - start)
        print(f"images ({image_size}px): 1 worker {rates[1]:,.0f}/s, {cores} workers {rates[cores]:,.0f}/s, "
              f"ratio {rates[cores] / rates[1]:.2f}")

        config = SynthConfig(users=users, items=items, density=density, seed=0, images=False)
        start = time.perf_counter()
        generate(config, Path(tmp) / "shop")
        seconds = time.perf_counter() - start
        print(f"ratings: {config.n_ratings:,} in {seconds:.1f}s ({config.n_ratings / seconds:,.0f} ratings/s), "
              f"images skipped")


if __name__ == "__main__":
    typer.run(main)
