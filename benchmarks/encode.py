"""Encoding throughput, stage by stage: `fusionrec encode`'s pipeline against its own model alone.

On one synthetic shop, with the same batches, batch size, device and precision:
- preprocessing: `prepare_texts` / `prepare_images` (what the pipeline's CPU tasks run) on one
  thread in this process, rows/s per CPU;
- model only: the encoder's `forward` on already-preprocessed batches in this process (all cores,
  or the GPU), after one warm-up batch;
- pipeline: `encode_dataset` end to end on a local Ray started beforehand (Ray Data tasks and the
  actor pool, model loading and the table writes included); its time to the first result, its
  steady rate (the middle 80 % of the rows) and, on CUDA, the mean GPU utilisation over that
  window (nvidia-ml-py);
- pipeline / model only, for each kind.
The last line is one JSON object.

    .venv/bin/python benchmarks/encode.py [--users 3000 --items 2000 --images 400]
    .venv/bin/python benchmarks/encode.py --scale      # the driver's peak memory, 10k vs 100k images

`--scale` encodes the images of a 10,000- and a 100,000-item shop (32 px pictures read at 32 px, no
text; the ViT prepared beforehand), each in a fresh process, and prints each driver's peak RSS and
what it grew by during `encode_dataset`, with the part of it that is Ray's shared object store, and
the peak of its private memory (RssAnon), and how long the first result took.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import typer

from fusionrec.config import state_folder
from fusionrec.data.synth import SynthConfig, generate
from fusionrec.data.validate import Dataset, load_dataset
from fusionrec.encoders.base import (
    DEFAULT_IMAGE_MODEL,
    DEFAULT_TEXT_MODEL,
    ImageEncoder,
    TextEncoder,
    resolve_model,
)
from fusionrec.encoders.batch_inference import BATCH_SIZE, prepare_images, prepare_texts
from fusionrec.encoders.pipeline import EncodeConfig, encode_dataset
from fusionrec.ops.ray_runtime import ensure_ray

app = typer.Typer(add_completion=False)


def only(dataset: Dataset, kind: str, items: int | None = None) -> Dataset:
    """The dataset with one kind of content (and at most `items` items, no users, for images)."""
    spec = dataset.spec
    if kind == "text":
        users, items_spec = (dataclasses.replace(spec.users, image=None), dataclasses.replace(spec.items, image=None))
        return dataclasses.replace(dataset, spec=dataclasses.replace(spec, users=users, items=items_spec))
    users, items_spec = (dataclasses.replace(spec.users, text=None, image=None),
                         dataclasses.replace(spec.items, text=None))
    return dataclasses.replace(dataset, users=dataset.users.iloc[:0], items=dataset.items.iloc[:items],
                               spec=dataclasses.replace(spec, users=users, items=items_spec))


class GpuUtilisation:
    """GPU busy % sampled every 0.1 s (nvidia-ml-py), with time stamps; no samples without CUDA."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # noqa: BLE001 - no NVIDIA driver, no library: no figure
            self.handle = None
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while self.handle is not None and not self.stop.wait(0.1):
            self.samples.append((time.perf_counter(), self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))

    def mean(self, start: float, end: float) -> float | None:
        window = [busy for t, busy in self.samples if start <= t <= end]
        return float(np.mean(window)) / 100 if window else None


def preprocess_batches(kind: str, values: list[str], root: Path, model: str, size: int, chunks: str,
                       batch_size: int) -> tuple[list[dict], float]:
    """The pipeline's preprocessing of `values` in batches, on this thread: (batches, rows/s), after
    one warm-up batch (a pipeline worker loads the tokenizer once, as this does in it)."""
    def prepare(first: int) -> dict:
        part = np.array(values[first:first + batch_size], object)
        batch = {"key": part, "value": part}
        return prepare_texts(batch, model, chunks) if kind == "text" else prepare_images(batch, str(root), size)

    prepare(0)
    start = time.perf_counter()
    batches = [prepare(first) for first in range(0, len(values), batch_size)]
    return batches, len(values) / (time.perf_counter() - start)


def model_only(encoder, kind: str, batches: list[dict]) -> float:
    """Rows/s of the encoder's forward pass alone over `batches`, after one warm-up pass."""
    import torch

    def run(batch):
        return encoder.forward(batch["rgb"]) if kind == "image" else encoder.forward(batch["tokens"], batch["lengths"])

    run(batches[0])
    if encoder.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        run(batch)  # each returns numpy: the device has finished it
    return sum(len(b["key"]) for b in batches) / (time.perf_counter() - start)


def pipeline_run(data: Dataset, out: Path, config: EncodeConfig, gpu: GpuUtilisation) -> dict[str, dict]:
    """encode_dataset with every result batch time-stamped: per kind, rows/s end to end (from the
    call for the first kind, from the previous kind's last result for the next), time to its first
    result, rate over the middle 80 % of its rows, GPU busy over that window."""
    arrivals: dict[str, list[tuple[float, int]]] = {}
    plans = []
    start = time.perf_counter()
    encode_dataset(data, out, config, on_plan=plans.append,
                   on_batch=lambda kind, n: arrivals.setdefault(kind, []).append((time.perf_counter(), n)))
    print(f"pipeline: {plans[0].line()}")
    figures, began = {}, start
    for kind, stamps in arrivals.items():
        times = np.array([t for t, _ in stamps])
        rows = np.cumsum([n for _, n in stamps])
        low, high = np.searchsorted(rows, 0.1 * rows[-1]), np.searchsorted(rows, 0.9 * rows[-1])
        steady = (rows[high] - rows[low]) / (times[high] - times[low]) if times[high] > times[low] else None
        figures[kind] = {"rows": int(rows[-1]), "per_s": float(rows[-1] / (times[-1] - began)),
                         "first_s": float(times[0] - began), "steady_per_s": steady,
                         "gpu_util": gpu.mean(times[low], times[high])}
        began = times[-1]
    return figures


@app.command()
def main(users: int = 3000, items: int = 2000, images: int = 400, image_size: int = 128,
         batch_size: int | None = None, precision: str = "auto", text_model: str = DEFAULT_TEXT_MODEL,
         image_model: str = DEFAULT_IMAGE_MODEL, sample: int = 2000,
         scale: bool = typer.Option(False, help="Measure the driver's peak memory at 10k and 100k images.")) -> None:
    if scale:
        return scale_runs()
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()
    cores = os.cpu_count() or 1
    cache = state_folder() / "models"
    with tempfile.TemporaryDirectory() as tmp:
        shop = Path(tmp) / "shop"
        started = time.perf_counter()
        generate(SynthConfig(users=users, items=items, density=min(1.0, 20 / items), seed=0, image_size=image_size),
                 shop)
        print(f"shop: {users} users, {items} items, {image_size} px pictures, made in "
              f"{time.perf_counter() - started:.0f} s")
        dataset = load_dataset(shop, check_images=False)
        ensure_ray(num_cpus=cores)
        gpu = GpuUtilisation()
        gpu.thread.start()
        config = EncodeConfig(cache=cache, text_model=text_model, image_model=image_model, batch_size=batch_size,
                              precision=precision)
        pipeline = {**pipeline_run(only(dataset, "text"), Path(tmp) / "text", config, gpu),
                    **pipeline_run(only(dataset, "image", images), Path(tmp) / "image", config, gpu)}
        gpu.stop.set()

        # The same work in this process: the pipeline's batches, device and precision.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(cores)
        rng = np.random.default_rng(0)
        texts = [*dataset.users["self_intro"], *dataset.items["description"]]
        texts = [texts[k] for k in rng.permutation(len(texts))[:sample]]
        pictures = list(dataset.items["image"][:min(images, sample)])
        rows = {}
        for kind, alias, values in (("text", text_model, texts), ("image", image_model, pictures)):
            model = resolve_model(alias, cache)
            if kind == "text":
                encoder = TextEncoder(model, device=device, chunks=config.text_chunks, precision=precision)
            else:
                encoder = ImageEncoder(model, device=device, precision=precision)
            size = encoder.image_size if kind == "image" else 0
            batches, prep_rate = preprocess_batches(kind, values, shop, model, size, config.text_chunks,
                                                    batch_size or BATCH_SIZE[device][kind])
            model_rate = model_only(encoder, kind, batches)
            ran = pipeline[kind]
            rows[kind] = {"preprocess_per_cpu": prep_rate, "model_only": model_rate, **ran}
            steady = f"{ran['steady_per_s']:,.0f}/s" if ran["steady_per_s"] else "n/a"
            util = f", GPU busy {ran['gpu_util']:.0%}" if ran["gpu_util"] is not None else ""
            print(f"{kind}: preprocessing {prep_rate:,.0f}/s per CPU; model only {model_rate:,.1f}/s "
                  f"({device}, {encoder.precision}); pipeline {ran['rows']:,} rows at {ran['per_s']:,.1f}/s end to "
                  f"end, first result after {ran['first_s']:.1f} s, steady {steady}{util}; "
                  f"pipeline / model only {ran['per_s'] / model_rate:.2f}")
    print(json.dumps({
        "device": device, "cores": cores, "image_px": encoder.image_size,
        "texts_per_s": rows["text"]["per_s"], "images_per_s": rows["image"]["per_s"],
        "model_only_texts_per_s": rows["text"]["model_only"], "model_only_images_per_s": rows["image"]["model_only"],
        "pipeline_over_model_text": rows["text"]["per_s"] / rows["text"]["model_only"],
        "pipeline_over_model_images": rows["image"]["per_s"] / rows["image"]["model_only"],
        "steady_texts_per_s": rows["text"]["steady_per_s"], "steady_images_per_s": rows["image"]["steady_per_s"],
        "first_result_s": {"text": rows["text"]["first_s"], "image": rows["image"]["first_s"]},
        "preprocess_per_cpu": {"text": rows["text"]["preprocess_per_cpu"],
                               "image": rows["image"]["preprocess_per_cpu"]},
        "gpu_util": rows["image"]["gpu_util"], "gpu_util_text": rows["text"]["gpu_util"],
    }))


def _status_mb(field: str) -> float:
    """A field of /proc/self/status in MB (VmHWM: this process's peak RSS; RssAnon: its private memory;
    RssShmem: pages of shared memory it has touched, such as Ray's object store)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _driver_peak(shop: str, out: str, queue) -> None:
    """In a fresh process: encode the shop's item images; report peak RSS (all of it, and the
    private part sampled every 0.1 s) and how much each grew during encode_dataset."""
    ensure_ray(num_cpus=os.cpu_count())
    dataset = only(load_dataset(Path(shop), check_images=False), "image")
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent into a spawned
    # child, so a parent that once held more (the ViT it prepared) would set the child's peak.
    before, private_before = _status_mb("VmHWM"), _status_mb("RssAnon")
    private, done = [private_before], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            private.append(_status_mb("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start, first = time.perf_counter(), []

    def arrived(kind: str, rows: int) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    encode_dataset(dataset, Path(out), EncodeConfig(cache=state_folder() / "models", image_size=32), on_batch=arrived)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak = _status_mb("VmHWM")
    queue.put({"items": len(dataset.items), "peak_mb": peak, "growth_mb": peak - before,
               "private_peak_mb": max(private), "private_growth_mb": max(private) - private_before,
               "shared_mb": _status_mb("RssShmem"), "seconds": seconds, "first_result_s": first[0]})


def scale_runs() -> None:
    # The default ViT is prepared once, here, on first use: preparing it in the first driver added
    # about 840 MB to that driver's private memory, a one-off that says nothing of how it scales.
    resolve_model(DEFAULT_IMAGE_MODEL, state_folder() / "models")
    spawn = multiprocessing.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for items in (10_000, 100_000):
            shop = Path(tmp) / f"shop-{items}"
            generate(SynthConfig(users=10, items=items, density=min(1.0, 20 / items), seed=0, image_size=32), shop)
            queue = spawn.Queue()
            child = spawn.Process(target=_driver_peak, args=(str(shop), str(Path(tmp) / f"features-{items}"), queue))
            child.start()
            result = queue.get()
            child.join()
            results.append(result)
            print(f"{items:,} items' images (32 px): driver peak RSS {result['peak_mb']:,.0f} MB (grew "
                  f"{result['growth_mb']:,.0f} MB during encode_dataset; {result['shared_mb']:,.0f} MB of it "
                  f"Ray's shared object store at the end), private memory peak {result['private_peak_mb']:,.0f} MB "
                  f"(grew {result['private_growth_mb']:,.0f} MB), first result after {result['first_result_s']:.1f} s, "
                  f"{result['seconds']:.0f} s in all")
    print(json.dumps({key: {str(r["items"]): r[field] for r in results} for key, field in (
        ("driver_peak_mb", "peak_mb"), ("driver_growth_mb", "growth_mb"), ("driver_private_peak_mb", "private_peak_mb"),
        ("driver_private_growth_mb", "private_growth_mb"), ("driver_shared_mb", "shared_mb"),
        ("first_result_s", "first_result_s"))}))


if __name__ == "__main__":
    app()
