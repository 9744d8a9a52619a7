"""Training on a device: the epoch loop, validation and full ranking keep every tensor on the device
they are given, a state trained on one device loads and resumes on another, and Ray's resources
(not the driver's torch) decide whether training reserves GPUs.

On a CPU-only machine the device given ("cpu") is also torch's default, so a tensor created without
naming a device lands in the right place by luck, and a missed `device=` or `.to(device)` goes
unnoticed until the code meets a GPU. `elsewhere_by_default` changes that: while it is active, a
tensor that fusionrec's own code creates without naming a device is created on "meta" (a device
without data), and every module of the model checks that what it is handed is on the given device.
A path that forgets the device then fails here, as it would on a GPU: a meta input trips the check,
and a meta tensor mixed with real ones, or read for its value, raises.

The CUDA tests are skipped without a GPU. None of this module imports MLflow or Optuna: it runs on
a GPU machine that has neither (Ray is needed for the Ray Train test and for `fit_in_trial`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors  # what torch.set_default_device redirects

import fusionrec.search.trial
import fusionrec.training.engine
import fusionrec.training.ray_train
from fusionrec.models.config import ModelConfig
from fusionrec.search.trial import fit_in_trial
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import loop_data, prepare
from fusionrec.training.engine import load_state, new_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# fit_in_trial asks Tune for a checkpoint; outside a trial Tune warns and answers None.
pytestmark = pytest.mark.filterwarnings("ignore:`get_checkpoint` is meant to only be called")


class _UnnamedDeviceIsMeta(TorchFunctionMode):
    """Tensor constructors called from fusionrec's code without a device create on "meta". Calls
    from torch itself (Adam's step counters, say) are left alone: only our code is under test; so
    is building a model, which happens on the CPU by design (it is moved to the device after)."""

    building = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1).f_globals.get("__name__", "")  # whoever called the torch function
        if (func in _device_constructors() and kwargs.get("device") is None and caller.startswith("fusionrec.")
                and not self.building):
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _inputs_on(device: torch.device):
    def check(module, inputs):
        tensors = [t for x in inputs for t in (x.values() if isinstance(x, dict) else [x])
                   if isinstance(t, torch.Tensor)]
        wrong = {str(t.device) for t in tensors if t.device.type != device.type}
        assert not wrong, f"{type(module).__name__} was handed tensors on {wrong}, not {device}"

    return check


@contextlib.contextmanager
def elsewhere_by_default(monkeypatch, device: torch.device, validated: list):
    """While active: fusionrec's unplaced tensors go to "meta"; every module of each model that
    fit_in_trial builds checks its inputs are on `device`; `validated` collects the device that
    each call of engine.validate was given."""

    def checked_model(*args, **kwargs):
        mode.building = True
        try:
            model = new_model(*args, **kwargs)
        finally:
            mode.building = False
        for module in model.modules():
            module.register_forward_pre_hook(_inputs_on(device))
        return model

    def recorded_validate(*args, **kwargs):
        validated.append(inspect.signature(validate).bind(*args, **kwargs).arguments["device"])
        return validate(*args, **kwargs)

    validate = fusionrec.training.engine.validate
    monkeypatch.setattr(fusionrec.search.trial, "new_model", checked_model)
    monkeypatch.setattr(fusionrec.training.engine, "validate", recorded_validate)
    with _UnnamedDeviceIsMeta() as mode:
        yield


def _loop_data(shop: Path, features: Path, **settings):
    cfg = TrainConfig(dataset=str(shop), features=str(features), batch_size=64, **settings)
    prepared = prepare(cfg)
    return cfg, loop_data(prepared.users, prepared.items, prepared.ratings, prepared.split)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("objective", "split"), [("rating", "random"), ("implicit", "random"),
                                                  ("implicit", "cold-items")])
def test_every_tensor_of_the_loop_is_on_the_given_device(tiny_shop, random_features, monkeypatch, device,
                                                         objective, split):
    """Training batches, sampled negatives (from every item, or from a pool of training items under
    cold-items), validation and full ranking (implicit), the weight average and the kept best state."""
    device = torch.device(device)
    cfg, data = _loop_data(tiny_shop, random_features, epochs=2, objective=objective, split=split)
    validated = []
    with elsewhere_by_default(monkeypatch, device, validated):
        model, last = fit_in_trial(cfg, data, threads=1, device=device)
    assert validated == [device] * cfg.epochs
    assert {p.device.type for p in [*model.parameters(), *model.buffers()]} == {device.type}
    assert math.isfinite(last["best"]["value"])
    assert {t.device.type for t in last["best"]["state"].values()} == {"cpu"}  # what a CPU driver loads


def _checkpoint_at(folder: Path):
    """A `report` for fit_in_trial that saves each epoch's state where a resumed trial finds it."""

    def report(metrics: dict, state: dict) -> None:
        torch.save(state, folder / "state.pt")

    return report


@pytest.mark.parametrize(("first", "then"), [("cpu", "cpu"), pytest.param("cuda", "cpu", marks=CUDA),
                                             pytest.param("cpu", "cuda", marks=CUDA)])
def test_a_checkpoint_resumes_on_either_device(tiny_shop, random_features, tmp_path, monkeypatch, first, then):
    import ray.tune

    cfg, data = _loop_data(tiny_shop, random_features, epochs=1, objective="implicit", split="cold-items")
    fit_in_trial(cfg, data, threads=1, device=torch.device(first), report=_checkpoint_at(tmp_path))
    monkeypatch.setattr(ray.tune, "get_checkpoint", lambda: ray.tune.Checkpoint.from_directory(str(tmp_path)))
    epochs = []
    model, last = fit_in_trial(replace(cfg, epochs=2), data, threads=1,
                               device=torch.device(then), report=lambda metrics, state: epochs.append(metrics["epoch"]))
    assert epochs == [1]  # epoch 0 came from the checkpoint
    steps = math.ceil(len(data.train) / cfg.batch_size)
    assert {int(s["step"]) for s in last["optimizer"]["state"].values()} == {2 * steps}  # Adam went on counting
    assert next(model.parameters()).device.type == then and math.isfinite(last["best"]["value"])


@CUDA
def test_fusion_trains_on_cuda_like_on_the_cpu(tiny_shop, random_features):
    """FusionNeuMF, a few epochs in the in-process loop (no MLflow): on the GPU, a sane validation MSE
    close to the CPU's, and a best state that a fresh CPU model (the driver's, in `fit`) loads."""
    cfg, data = _loop_data(tiny_shop, random_features, epochs=3)
    on_gpu, gpu = fit_in_trial(cfg, data, threads=1, device=torch.device("cuda"))
    _, cpu = fit_in_trial(cfg, data, threads=1, device=torch.device("cpu"))
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
    mean_guess = float(((data.validation["rating"] - data.train["rating"].mean()) ** 2).mean())
    assert math.isfinite(gpu["best"]["value"]) and gpu["best"]["value"] < 1.5 * mean_guess
    assert gpu["best"]["value"] == pytest.approx(cpu["best"]["value"], rel=0.15)  # other random draws on a GPU
    on_cpu = new_model(data, cfg)
    on_cpu.load_state_dict(gpu["best"]["state"])
    users, items = (torch.as_tensor(data.validation[c].to_numpy()) for c in ("user_idx", "item_idx"))
    with torch.no_grad():
        assert torch.allclose(on_cpu.eval()(users, items), on_gpu(users.cuda(), items.cuda()).cpu(), atol=1e-4)


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
@pytest.mark.parametrize(("resources", "use_gpu"), [({"CPU": 2.0}, False), ({"CPU": 2.0, "GPU": 1.0}, True)])
def test_the_cluster_decides_whether_workers_reserve_gpus(tiny_shop, tmp_path, monkeypatch, resources, use_gpu):
    """Ray's resources, not this process's torch, decide: a driver without CUDA drives GPU workers,
    and a driver with CUDA drives CPU-only workers on a cluster without GPUs."""
    import ray
    import ray.train.torch

    from fusionrec.ops.ray_runtime import concurrent_trials, trial_resources

    class Stop(Exception):
        pass

    def trainer(*args, scaling_config, **kwargs):
        built.append(scaling_config)
        raise Stop

    built = []
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not use_gpu)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", trainer)
    cfg = TrainConfig(dataset=str(tiny_shop), epochs=1, model=ModelConfig(model="svd"))
    with pytest.raises(Stop):
        fusionrec.training.ray_train.fit(cfg, prepare(cfg), tmp_path)
    assert built[0].use_gpu is use_gpu and built[0].resources_per_worker == {"CPU": 2}
    assert trial_resources(1) == ({"cpu": 1, "gpu": 1} if use_gpu else {"cpu": 1})
    assert concurrent_trials(1) == (1 if use_gpu else 2)  # one trial per GPU


@CUDA
@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
def test_ray_train_trains_on_the_cluster_gpu(tiny_shop, random_features, tmp_path):
    """`fit` through Ray Train, one worker, no MLflow: the worker trains on the GPU (its checkpoint
    holds CUDA tensors) and the driver gets the best model back on the CPU."""
    from fusionrec.ops.ray_runtime import use_gpus

    assert use_gpus()
    cfg = TrainConfig(dataset=str(tiny_shop), features=str(random_features), epochs=2, batch_size=64,
                      objective="implicit")
    model, saved = fusionrec.training.ray_train.fit(cfg, prepare(cfg), tmp_path)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and math.isfinite(saved["best"]["value"])
    paths = list(tmp_path.glob("*/checkpoint_*/state.pt"))
    written = [torch.load(path, weights_only=False) for path in paths]
    assert written and all(t.device.type == "cuda" for state in written for t in state["model"].values())
    assert all(t.device.type == "cpu" for t in load_state(paths[0])["model"].values())  # what `fit` reads
