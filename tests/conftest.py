"""Shared fixtures: a tiny synthetic shop and a builder for hand-made (often broken) datasets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fusionrec.data.synth import SynthConfig, generate  # noqa: E402

SPEC = {
    "name": "tiny",
    "rating_scale": {"min": 1, "max": 5},
    "relevance_threshold": 4,
    "users": {"id": "user_id", "text": "bio", "image": "photo", "categorical": ["region"], "numeric": ["age"]},
    "items": {"id": "item_id", "text": "description", "image": "image", "categorical": ["brand"],
              "numeric": ["price"]},
}


@contextlib.contextmanager
def leaves_no_temp_folders(prefix: str):
    """Fails if the block leaves a folder named `prefix`* in the system's temporary folder that was
    not there before (others' folders, made before, may stay)."""
    before = set(Path(tempfile.gettempdir()).glob(f"{prefix}*"))
    yield
    assert set(Path(tempfile.gettempdir()).glob(f"{prefix}*")) <= before


def make_dataset(root: Path, fmt: str = "parquet", users=None, items=None, ratings=None, spec=None) -> Path:
    """Write a small valid dataset to `root`; pass frames or a spec to replace the defaults."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        Image.new("RGB", (8, 8), colour).save(root / "images" / name)
    users = users if users is not None else pd.DataFrame({
        "user_id": ["u1", "u2", "u3"], "bio": ["likes silk", None, "likes linen"],
        "photo": ["images/a.png", None, "images/b.png"], "region": ["north", "south", None], "age": [30, 41, None],
    })
    items = items if items is not None else pd.DataFrame({
        "item_id": ["i1", "i2"], "description": ["a silk dress", "a linen dress"],
        "image": ["images/b.png", "images/c.png"], "brand": ["X", "Y"], "price": [10.5, 20.0],
    })
    ratings = ratings if ratings is not None else pd.DataFrame({
        "user_id": ["u1", "u1", "u2", "u3"], "item_id": ["i1", "i2", "i1", "i2"], "rating": [5, 2, 3, 4],
    })
    (root / "dataset.yaml").write_text(yaml.safe_dump(spec or SPEC))
    for name, frame in (("users", users), ("items", items), ("ratings", ratings)):
        if fmt == "csv":
            frame.to_csv(root / f"{name}.csv", index=False)
        else:
            frame.to_parquet(root / f"{name}.parquet", index=False)
    return root


@pytest.fixture(scope="session")
def tiny_shop(tmp_path_factory) -> Path:
    """A 60-user, 40-item synthetic shop with images (built once per test session)."""
    out = tmp_path_factory.mktemp("shop") / "shop"
    generate(SynthConfig(users=60, items=40, density=0.2, seed=7, image_size=32), out, workers=1)
    return out


@pytest.fixture(scope="session")
def random_features(tiny_shop, tmp_path_factory) -> Path:
    """Feature tables for the tiny shop in the encode pipeline's format, random 8-d embeddings."""
    from fusionrec.encoders.pipeline import _write

    folder = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    for side, column in (("users", "user_id"), ("items", "item_id")):
        ids = pd.read_parquet(tiny_shop / f"{side}.parquet")[column]
        for kind in ("text", "image"):
            frame = pd.DataFrame({"id": ids, "content_hash": "x", "mask": 1,
                                  "embedding": list(rng.normal(size=(len(ids), 8)).astype(np.float32))})
            _write(folder / f"{side}.{kind}.parquet", frame, 8, {"encoder": "random", "dim": 8})
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised tiny BERT / ViT / DINOv2 checkpoints (the BERT reuses MiniLM's tokenizer)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    from fusionrec.encoders.prepare import minilm_path

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-models")
    bert = root / "tiny-bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
              ).save_pretrained(bert)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_path() / name).is_file():
            shutil.copy(minilm_path() / name, bert / name)
    vit = root / "tiny-vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(vit)
    dinov2 = root / "tiny-dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(dinov2)
    return {"bert": bert, "vit": vit, "dinov2": dinov2}


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session (2 CPUs, small object store)."""
    import ray

    from fusionrec.ops.ray_runtime import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def real_models_cache(tmp_path_factory) -> Path:
    """The real offline encoders, prepared once a session (MiniLM located, DINOv2 converted from the ONNX)."""
    from fusionrec.encoders.prepare import prepare

    path = tmp_path_factory.mktemp("models")
    first = prepare(path)
    assert first.converted and first.max_abs_diff < 1e-3
    return path


def _tiny_features(shop, tiny_models, folder):
    """Feature tables in the encode pipeline's format: random embeddings, with the tiny BERT / DINOv2
    recorded as their encoders (so serving encodes cold-start payloads with those)."""
    from fusionrec.encoders.base import ImageEncoder, TextEncoder
    from fusionrec.encoders.pipeline import _write

    encoders = {"text": TextEncoder(str(tiny_models["bert"])), "image": ImageEncoder(str(tiny_models["dinov2"]))}
    for side, id_column in (("users", "user_id"), ("items", "item_id")):
        ids = pd.read_parquet(shop / f"{side}.parquet")[id_column]
        for kind, encoder in encoders.items():
            meta = {"encoder": encoder.name, "model": str(tiny_models["bert" if kind == "text" else "dinov2"]),
                    "kind": kind, "dim": encoder.dim, "pooling": "cls"}
            meta |= {"image_size": None} if kind == "image" else {}
            embeddings = np.random.default_rng(0).normal(size=(len(ids), encoder.dim)).astype(np.float32)
            frame = pd.DataFrame({"id": ids, "content_hash": "x", "mask": 1, "embedding": list(embeddings)})
            _write(folder / f"{side}.{kind}.parquet", frame, encoder.dim, meta)
    return folder


def _make_bundle(shop, features, folder, model="fusion"):
    """An untrained model saved as a bundle (serving does not care how good it is)."""
    from fusionrec.data.validate import load_dataset
    from fusionrec.encoders.pipeline import feature_encoders
    from fusionrec.evaluate import index_ratings
    from fusionrec.models.bundle import save_bundle
    from fusionrec.models.config import ModelConfig
    from fusionrec.models.content import build_side
    from fusionrec.models.factory import build_model

    data = load_dataset(shop, check_images=False)
    users = build_side(data.users, data.spec.users, "users", features)
    items = build_side(data.items, data.spec.items, "items", features)
    ratings = index_ratings(data, users.ids, items.ids)
    net = build_model(users, items, ModelConfig(model=model, global_mean=3.0)).eval()
    net.mark_seen(ratings["user_idx"].to_numpy(), ratings["item_idx"].to_numpy())
    save_bundle(folder, net, users, items, {"dataset": "tiny", "rating_scale": [1, 5], "relevance_threshold": 4,
                                           "objective": "rating", "split": "random", "seed": 0,
                                           "encoders": feature_encoders(features)},
                seen=ratings[["user_idx", "item_idx"]].to_numpy())
    return folder, ratings


@pytest.fixture(scope="session")
def served_bundles(tiny_shop, tiny_models, tmp_path_factory) -> dict:
    """Two untrained model bundles over the tiny shop (fusion and svd), with feature tables made
    by the tiny BERT / DINOv2 so cold-start payloads can be encoded; plus the indexed ratings."""
    root = tmp_path_factory.mktemp("serve")
    features = _tiny_features(tiny_shop, tiny_models, root / "features")
    fusion, ratings = _make_bundle(tiny_shop, features, root / "fusion")
    svd, _ = _make_bundle(tiny_shop, features, root / "svd", model="svd")
    return {"fusion": fusion, "svd": svd, "ratings": ratings}


@pytest.fixture(scope="session")
def free_port():
    """A function giving a TCP port on loopback that nothing listens on right now."""
    from fusionrec.ops.processes import free_port

    return free_port


@pytest.fixture(scope="module")
def registered(served_bundles, tmp_path_factory):
    """An MLflow store with the two bundles registered: version 1 (fusion, champion), version 2 (svd)."""
    import mlflow

    from fusionrec import registry

    home = tmp_path_factory.mktemp("serve-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("FUSIONREC_HOME", str(home))
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    registry.setup()
    identity = {"data": "d", "features": "f", "split": "random", "seed": 0, "objective": "rating"}
    for name, val_mse in (("fusion", 1.0), ("svd", 2.0)):
        with mlflow.start_run() as run:
            mlflow.set_tags(registry.identity_tags(identity, "val_mse", "min"))
            mlflow.log_metric("val_mse", val_mse)
            registry.register(registry.log_bundle(served_bundles[name]), run.info.run_id)
    yield home
    patch.undo()


def port_processes(url: str) -> list:
    """The processes (psutil) listening on `url`'s port."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    listening = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    return [psutil.Process(pid) for pid in listening if pid]


def port_holders(url: str) -> set[str]:
    """The names of the processes listening on `url`'s port: which proxy answers it."""
    return {process.name() for process in port_processes(url)}


def kill_one_ranker() -> int:
    """Kill one running ranker replica of the Serve application (as a crash would, no restart);
    returns how many there were."""
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Ranker#" in a["name"]]
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    return len(replicas)


def registered_epoch(storage: Path) -> int | None:
    """The epoch of the latest checkpoint Ray Train's controller has on record under `storage` (a
    RunConfig storage_path): the one a restart resumes from. The controller rewrites its checkpoint
    manager's snapshot on registering each report, which it collects from the workers once per
    health-check interval."""
    for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (json.JSONDecodeError, KeyError):  # caught while being written
            return None
        return latest["metrics"]["epoch"] if latest else None
    return None


# A local cluster as a user runs it: `fusionrec cluster up|down`, `fusionrec job submit`, each in a
# subprocess (this test session may have a local Ray of its own).
FUSIONREC = [str(Path(sys.executable).parent / "fusionrec")]
ROOT = Path(__file__).resolve().parents[1]  # `job submit` packages the working directory: the repository


@pytest.fixture
def cluster_env(tmp_path) -> dict[str, str]:
    """A state folder of the test's own; no cluster or tracking server inherited from outside."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return env | {"FUSIONREC_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def fusionrec(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*FUSIONREC, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def session_processes(pids: list[int]) -> list:
    """The processes these pids are, and every process in the sessions they lead (a node's raylet,
    workers, the tracking server's workers), as psutil objects: is_running() is false for a pid
    reused since."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid in pids or os.getsid(p.pid) in pids:
                found.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def assert_down_left_nothing(down: subprocess.CompletedProcess, env: dict, state: dict) -> None:
    """`down`, the `fusionrec cluster down` of the cluster recorded as `state` (STATE/cluster.json, read
    while it was up), stopped it: none of its processes, ports or Ray temp dir is left, and another
    `down` says there is no cluster."""
    assert down.returncode == 0 and down.stdout.startswith("cluster down:"), down.stdout + down.stderr
    assert session_processes([p["pid"] for p in state["processes"]]) == []
    ports = [state["address"].rsplit(":", 1)[1], state["dashboard_url"].rsplit(":", 1)[1],
             state["tracking_uri"].rsplit(":", 1)[1]]
    left = subprocess.run(["pgrep", "-f", "|".join(f"[:= ]{port}( |$)" for port in ports)], capture_output=True,
                          text=True)
    assert left.stdout.strip() == "", left.stdout
    assert not Path(state["temp_dir"]).exists()
    again = fusionrec(env, "cluster", "down")
    assert again.returncode == 0 and again.stdout.strip() == "no cluster"
    assert fusionrec(env, "cluster", "status").stdout.startswith("no cluster")


def python_stacks(pid: int) -> str:
    """The Python stacks of `pid` and of Serve's controller, when a process hangs (py-spy, if it may trace)."""
    pids = [str(pid)] + subprocess.run(["pgrep", "-f", "ServeController"], capture_output=True,
                                       text=True).stdout.split()
    dumps = [subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "--pid", p], capture_output=True,
                            text=True, timeout=30) for p in pids]
    return "\n".join(d.stdout + d.stderr for d in dumps)


@contextlib.contextmanager
def fusionrec_serve(args: list[str], env: dict[str, str], seconds: float = 120):
    """`fusionrec serve ARGS --port P` in its own process until /healthz answers 200 (its URL is
    yielded); then Ctrl-C, and it must exit 0. Fails at once if the server exits early."""
    import tempfile

    import requests

    from fusionrec.ops.processes import free_port

    port = free_port()
    # Its output goes to a file, read on failure: a pipe nobody reads would block the server once full.
    output = tempfile.NamedTemporaryFile("w+", prefix="fusionrec-serve-", suffix=".log")
    server = subprocess.Popen([str(Path(sys.executable).parent / "fusionrec"), "serve", *args, "--port", str(port)],
                              env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def printed() -> str:
        return Path(output.name).read_text()[-4000:]

    try:
        deadline = time.monotonic() + seconds
        while True:
            assert server.poll() is None, f"fusionrec serve exited: {printed()}"
            assert time.monotonic() < deadline, f"fusionrec serve did not answer /healthz within {seconds:g} s"
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        yield url
    finally:
        server.send_signal(signal.SIGINT)
        try:
            assert server.wait(timeout=90) == 0, printed()
        except subprocess.TimeoutExpired:
            stacks = python_stacks(server.pid)
            server.kill()
            server.wait()
            raise AssertionError(f"fusionrec serve did not stop within 90 s of Ctrl-C: {printed()}\n"
                                 f"stacks before it was killed:\n{stacks}") from None
        finally:
            output.close()
