"""The encode pipeline's stages, in this process: the pool plan, the device an actor picks, and the
split encoder (CPU preprocessing, then forward passes) against the encoders' own `encode`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fusionrec.encoders import base
from fusionrec.encoders.base import ImageEncoder, TextEncoder
from fusionrec.encoders.batch_inference import ForwardPass, plan_pool, prepare_images, prepare_texts

TEXTS = ["I love silk. My style is romantic. I shop for weddings.", "Sturdy denim for travel.",
         "Hi! " * 12 + "A long last sentence about linen, cotton and wool for every season of the year."]


def test_cpu_cluster_runs_cpu_actors_that_leave_a_cpu_for_preprocessing():
    plan = plan_pool({"CPU": 2.0}, 2, actors=2, gpus_per_actor=None, batch_size=None, precision="auto")
    assert (plan.device, plan.precision, plan.actors, plan.gpus_per_actor) == ("cpu", "fp32", 2, 0.0)
    assert plan.threads == 1 and plan.cpus_per_actor == 0.5  # 2 x 0.5 reserved: one CPU stays free
    assert plan.batch_size == {"text": 32, "image": 32}
    big = plan_pool({"CPU": 16.0}, 16, actors=2, gpus_per_actor=None, batch_size=64, precision="bf16")
    assert (big.threads, big.cpus_per_actor, big.precision, big.batch_size["image"]) == (8, 7.5, "bf16", 64)


def test_gpu_cluster_runs_one_actor_per_gpu_in_bf16():
    plan = plan_pool({"CPU": 16.0, "GPU": 2.0}, 16, actors=5, gpus_per_actor=None, batch_size=None, precision="auto")
    assert (plan.device, plan.precision, plan.actors, plan.gpus_per_actor, plan.cpus_per_actor) == (
        "cuda", "bf16", 2, 1.0, 1.0)
    assert plan.batch_size == {"text": 1024, "image": 256}
    assert plan_pool({"CPU": 16.0, "GPU": 1.0}, 16, 2, None, None, "fp32").precision == "fp32"
    # asked for CPU actors on a GPU cluster: CPU actors, fp32
    cpu = plan_pool({"CPU": 16.0, "GPU": 1.0}, 16, 3, 0.0, None, "auto")
    assert (cpu.device, cpu.precision, cpu.actors, cpu.gpus_per_actor) == ("cpu", "fp32", 3, 0.0)
    with pytest.raises(ValueError, match="--gpus-per-actor 1: the Ray cluster has 0 GPU"):
        plan_pool({"CPU": 2.0}, 2, 1, 1.0, None, "auto")


def test_an_actor_without_a_reserved_gpu_never_touches_cuda(tiny_models, monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA touched")

    monkeypatch.setattr("ray.is_initialized", lambda: True)  # as inside an actor
    monkeypatch.setattr("ray.get_gpu_ids", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU...
    monkeypatch.setattr(torch.cuda, "init", no_cuda)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    actor = ForwardPass("text", str(tiny_models["bert"]), "tiny-bert", "cls", None, "sentence", "mean", "fp32", 1)
    assert actor.encoder.device == "cpu"  # ...but none reserved: the CPU
    batch = prepare_texts({"key": np.array(["a", "b", "c"], object), "value": np.array(TEXTS, object)},
                          str(tiny_models["bert"]), "sentence")
    assert actor(batch)["embedding"].shape == (3, 32)
    monkeypatch.setattr("ray.get_gpu_ids", lambda: ["0"])
    from fusionrec.ops.ray_runtime import assigned_device

    assert str(assigned_device()) == "cuda"
    # outside Ray: the CPU, without asking Ray (ray.get_gpu_ids() would start a local Ray here)
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    monkeypatch.setattr("ray.get_gpu_ids", no_cuda)
    assert str(assigned_device()) == "cpu"


@pytest.mark.parametrize("chunk_pooling", ["mean", "max", "set"])
def test_preprocessed_then_forward_is_the_encoders_own_encode(tiny_models, chunk_pooling, monkeypatch):
    model = str(tiny_models["bert"])
    batch = prepare_texts({"key": np.arange(3), "value": np.array(TEXTS, object)}, model, "sentence")
    assert [len(n) for n in batch["lengths"]] == [3, 1, 13]  # sentences per text, tokens unpadded
    actor = ForwardPass("text", model, "tiny-bert", "mean", None, "sentence", chunk_pooling, "fp32", 1)
    expected = TextEncoder(model, pooling="mean", chunks="sentence", chunk_pooling=chunk_pooling)
    piecewise = np.stack([expected.encode([text])[0] for text in TEXTS])  # each text alone: no batching at all
    assert np.allclose(actor(batch)["embedding"], piecewise, atol=1e-5)
    # bucketing: a budget of 24 tokens a forward pass cuts the sentences into many small batches,
    # sorted by length; the vectors come back in their own places
    monkeypatch.setitem(base.FORWARD_TOKENS, "cpu", 24)
    assert np.allclose(actor(batch)["embedding"], piecewise, atol=1e-5)


def test_images_travel_as_uint8_and_fail_one_by_one(tiny_models, tmp_path):
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    values = np.array(["0.png", "broken.png", "1.png", "missing.png"], object)
    batch = prepare_images({"key": values, "value": values}, str(tmp_path), 32)
    assert batch["rgb"].dtype == np.uint8 and batch["rgb"].shape == (4, 32, 32, 3)
    assert batch["error"][1].startswith("undecodable image broken.png") and "not found" in batch["error"][3]
    assert len({*batch["content_hash"][:3]}) == 3 and batch["content_hash"][3] == ""  # a file's bytes, if any
    out = ForwardPass("image", str(tiny_models["dinov2"]), "tiny", "cls", None, "none", "mean", "fp32", 1)(batch)
    encoder = ImageEncoder(str(tiny_models["dinov2"]))
    expected = encoder.encode([Image.open(tmp_path / f"{k}.png") for k in range(2)])
    assert np.allclose(out["embedding"][[0, 2]], expected, atol=1e-5)
    assert not out["embedding"][[1, 3]].any() and list(out["error"][[0, 2]]) == ["", ""]
