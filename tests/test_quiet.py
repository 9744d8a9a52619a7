"""Quiet by default: the demo's commands, run as a user runs them, print only the project's own lines.

Each command runs as its own process (as from `make demo`), so what Ray's C++ side, its raylet and
the other processes write to the inherited stdout/stderr is seen too. "Ours" is an allow-list of
the shapes of the lines the project writes; any other line fails the test and is printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _tiny_features

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]  # tune/widths.yaml and serve/config.yaml, as `make demo` reads them
OURS = [re.compile(pattern) for pattern in (
    r"wrote \S+: \d+ users, \d+ items, \d+ ratings in ", r"ok \S+: \d+ users, \d+ items",  # data synth, validate
    r"text: +all-minilm-l6-v2 at ", r"image: dinov2-vits14 (converted to|verified at) ",  # models prepare
    r"\d+ encoder actor\(s\) on ", r"(users|items)\.(text|image): \d+ of \d+ re-encoded", r"features in ",  # encode
    r"\|[ -]", r"Bayes floor \(",  # runs: the table and the floor
    r"test MSE \d", r"registered fusionrec version \d+: ", r'\{"mse": ',  # train (and tune --register)
    # tune: a line per trial, the board (header, rows that start with a trial id), the choice, best.yaml
    r"trial \w+: ", r"(all|best \d+ of) \d+ trials", r" *trial +defaults ", r" *[0-9a-f]{8}(_\d+)? +(True|False) ",
    r"selected trial: ", r"its model trained on seed ", r"the selected trial ", r"best configuration in ",
    r" *(- )?[a-z][a-z0-9_]*:( .*)?$", r" *- [\d.]+$",  # best.yaml printed (lower-case keys, list items)
    r"serving fusionrec version \d+ at ", r"POST /recommend ", r' {2}\{"items": ', r"service stopped$",  # serve demo
    r".*\d+%\|.*\| *\d+/\d+ ",  # our tqdm bars (trials, confirmations), where a terminal shows them
)]


def not_ours(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip() and not any(p.match(line) for p in OURS)]


def test_the_demo_prints_only_our_own_lines(tiny_shop, tiny_models, real_models_cache, tmp_path, free_port):
    from fusionrec.verbosity import QUIET_ENVIRONMENT, VERBOSE

    features = _tiny_features(tiny_shop, tiny_models, tmp_path / "features")  # encoders the demo's new user needs
    # A user's environment: none of the settings `configure` makes, no cluster, our own (new) MLflow store.
    env = {k: v for k, v in os.environ.items()
           if k not in QUIET_ENVIRONMENT and k not in (VERBOSE, "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["FUSIONREC_HOME"] = str(tmp_path / "home")
    fusionrec = str(BIN / "fusionrec")
    shop, features = str(tiny_shop), str(features)
    # The Makefile's demo, smaller, to stay near three minutes: a 10 x 10 shop encoded with the real
    # encoders (prepared once a session), then training, tuning and serving the tiny shop on the tiny
    # encoders' features (their cold-start encoders load in a second), with one epoch each.
    small = str(tmp_path / "small-shop")
    commands = [
        [fusionrec, "data", "synth", small, "--users", "10", "--items", "10", "--density", "0.3", "--image-size", "64"],
        [fusionrec, "data", "validate", shop],
        [fusionrec, "models", "prepare", "--cache", str(real_models_cache)],
        [fusionrec, "encode", small, "--out", str(tmp_path / "small-features"), "--cache", str(real_models_cache),
         "--actors", "1", "--image-size", "112"],
        [fusionrec, "train", shop, "--features", features, "--epochs", "1", "--register"],
        [fusionrec, "runs", shop, "--last", "1"],
        [fusionrec, "tune", shop, "--features", features, "--space", "tune/widths.yaml", "--trials", "2",
         "--epochs", "1", "--confirm-seeds", "1", "--register"],
        [str(BIN / "python"), "-m", "fusionrec.serve.demo", "--port", str(free_port())],
    ]
    noise = {}
    for command in commands:
        out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        if lines := not_ours(out.stdout) + not_ours(out.stderr):
            noise[" ".join(command[1:4])] = lines
    assert not noise, "lines the project did not write:\n" + "\n".join(
        f"{command}:\n  " + "\n  ".join(lines) for command, lines in noise.items())


@pytest.mark.parametrize("verbose", ["0", "1"])
def test_ray_actor_notices_are_dropped_from_stderr_and_nothing_else(verbose):
    notice = ("[2026-12-05 19:25:19,198 E 28145 28145] core_worker.cc:2465: Actor with class name: 'MapWorker(X)' "
              "and ID: 'f25c' has constructor arguments in the object store and max_restarts > 0. If the arguments "
              "... See https://github.com/ray-project/ray/issues/53727 for more details.")
    code = ("import os, sys; from fusionrec.verbosity import without_actor_notices\n"
            "with without_actor_notices():\n"
            "    os.write(2, b'[2026-12-05 19:25:19,198 W 1 1] core_worker.cc:1: another notice\\n')\n"
            f"    os.write(2, {notice!r}.encode() + b'\\n')\n"
            "    sys.stderr.write('\\rencoding text: 50%'); sys.stderr.flush()\n"
            "    os.write(2, b'\\n' + b'x' * 100000 + b'\\n')\n"  # more than a pipe holds at once
            "print('after', file=sys.stderr)\n")
    env = {**os.environ, "FUSIONREC_VERBOSE": verbose}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)  # bytes: \r kept
    assert out.returncode == 0, out.stderr
    assert out.stderr.decode().split("\n") == ["[2026-12-05 19:25:19,198 W 1 1] core_worker.cc:1: another notice",
                                      *([notice] if verbose == "1" else []),
                                      "\rencoding text: 50%", "x" * 100000, "after", ""]
