"""Where one forward-pass call of each encoder spends its time on CUDA (torch.profiler): a call's
wall time, the device's busy time inside it, and the top operators by host time. For the lent GPU
machine (benchmarks/gpu_machine.sh), on the random-weight models it makes.

    python3 benchmarks/gpu_profile.py MODELS_FOLDER
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import typer
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fusionrec.encoders.base import ImageEncoder, TextEncoder, tokenize

SENTENCES = ["I love silk.", "My style is romantic and I often shop for weddings and garden parties.",
             "Linen suits me in summer.", "Hi!", "I work as a nurse, so comfort matters more than anything else."]


def timed(call, repeats: int = 5) -> float:
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def report(name: str, rows: int, call) -> None:
    seconds = timed(call)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
    # Kernels and copies on the device (what the table's "Self CUDA time total" adds up).
    device_us = sum(e.self_device_time_total for e in prof.key_averages()
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    print(f"{name}: {rows} rows in {seconds * 1e3:.1f} ms a call ({rows / seconds:,.0f}/s); device busy "
          f"{device_us / 1e3:.1f} ms of it")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main(models: Path, texts: int = 1024, images: int = 256) -> None:
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(SENTENCES, 5)) for _ in range(texts)]
    text = TextEncoder(str(models / "minilm"), device="cuda", chunks="sentence", precision="bf16")
    tokens, lengths = tokenize(str(models / "minilm"), corpus, "sentence")
    report("text forward", texts, lambda: text.forward(tokens, lengths))
    image = ImageEncoder(str(models / "dinov2"), device="cuda", precision="bf16")
    rgb = rng.integers(0, 255, (images, image.image_size, image.image_size, 3), dtype=np.uint8)
    report("image forward", images, lambda: image.forward(rgb))


if __name__ == "__main__":
    typer.run(main)
