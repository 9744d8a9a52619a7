"""Encoding throughput: `fusionrec encode` on a local Ray against a plain single-process loop.

Same model, batch size and data (texts and images of the synthetic shop): (a) a plain loop in
this process with torch using all cores; (b) the Ray Data pipeline (`encode_dataset`, actor pool,
one torch thread per actor) on a local Ray started beforehand; model loading counted in both.
Prints items/s of each and the ratio (b)/(a); then the machine's practical peak (a large fp32
matmul) and each encoder's achieved GFLOP/s as a fraction of it (FLOPs counted by torch).

    .venv/bin/python benchmarks/encode.py [--users 5000 --items 3000 --images 400 --batch-size 32]
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
import typer
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers.utils import logging

from fusionrec.config import state_folder
from fusionrec.data.synth import SynthConfig, generate
from fusionrec.data.validate import load_dataset
from fusionrec.encoders.base import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, ImageEncoder, TextEncoder, resolve_model
from fusionrec.encoders.pipeline import EncodeConfig, encode_dataset
from fusionrec.encoders.prepare import prepare
from fusionrec.ray_runtime import ensure_ray


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_item(encoder, batch: list) -> float:
    with FlopCounterMode(display=False) as counter:
        encoder.encode(batch)
    return counter.get_total_flops() / len(batch)


def plain_loop(kind: str, model: str, inputs: list, batch_size: int) -> tuple[float, float]:
    """(items/s, FLOPs per item) of a single-process loop, model loading included."""
    start = time.perf_counter()
    encoder = TextEncoder(model) if kind == "text" else ImageEncoder(model)
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i:i + batch_size]
        encoder.encode(chunk if kind == "text" else [Image.open(p).convert("RGB") for p in chunk])
    rate = len(inputs) / (time.perf_counter() - start)
    sample = inputs[:batch_size] if kind == "text" else [Image.open(p).convert("RGB") for p in inputs[:batch_size]]
    return rate, flops_per_item(encoder, sample)


def main(users: int = 5000, items: int = 3000, images: int = 400, batch_size: int = 32) -> None:
    logging.disable_progress_bar()
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    cache = state_folder() / "models"
    prepare(cache)
    with tempfile.TemporaryDirectory() as tmp:
        shop = Path(tmp) / "shop"
        generate(SynthConfig(users=users, items=items, density=0.002, seed=0, image_size=128), shop)
        dataset = load_dataset(shop, check_images=False)
        # Text: every user and item text. Images: the first `images` items' photos, no text.
        spec = dataset.spec
        text_only = dataclasses.replace(dataset, spec=dataclasses.replace(
            spec, users=dataclasses.replace(spec.users, image=None), items=dataclasses.replace(spec.items, image=None)))
        image_only = dataclasses.replace(dataset, users=dataset.users.iloc[:0], items=dataset.items.iloc[:images],
                                         spec=dataclasses.replace(spec, users=dataclasses.replace(spec.users, text=None,
                                                                  image=None),
                                                                  items=dataclasses.replace(spec.items, text=None)))
        texts = [*dataset.users["self_intro"], *dataset.items["description"]]
        photos = [shop / p for p in image_only.items["image"]]
        ensure_ray(num_cpus=cores)
        peak = matmul_peak_gflops()
        print(f"machine: {cores} cores, fp32 matmul peak {peak:.0f} GFLOP/s")
        for kind, model_alias, inputs, data in (("text", DEFAULT_TEXT_MODEL, texts, text_only),
                                                ("image", DEFAULT_IMAGE_MODEL, photos, image_only)):
            model = resolve_model(model_alias, cache)
            plain_rate, flops = plain_loop(kind, model, inputs, batch_size)
            config = EncodeConfig(cache=cache, batch_size=batch_size, actors=cores)
            start = time.perf_counter()
            reports = encode_dataset(data, Path(tmp) / f"features-{kind}", config)
            ray_rate = sum(r.encoded for r in reports) / (time.perf_counter() - start)
            print(f"{kind}: {len(inputs)} items, batch {batch_size}: plain loop {plain_rate:.1f}/s, "
                  f"fusionrec encode (Ray, {cores} actors) {ray_rate:.1f}/s, ratio {ray_rate / plain_rate:.2f}; "
                  f"{flops / 1e9:.2f} GFLOP/item, plain {plain_rate * flops / 1e9:.0f} GFLOP/s = "
                  f"{plain_rate * flops / 1e9 / peak:.0%} of peak, Ray {ray_rate * flops / 1e9 / peak:.0%}")


if __name__ == "__main__":
    typer.run(main)
