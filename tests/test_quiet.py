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
    r"ok \S+: \d+ users, \d+ items",  # data validate
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


def test_the_demo_prints_only_our_own_lines(tiny_shop, tiny_models, tmp_path, free_port):
    from fusionrec.verbosity import QUIET_ENVIRONMENT, VERBOSE

    features = _tiny_features(tiny_shop, tiny_models, tmp_path / "features")  # encoders the demo's new user needs
    # A user's environment: none of the settings `configure` makes, no cluster, our own (new) MLflow store.
    env = {k: v for k, v in os.environ.items()
           if k not in QUIET_ENVIRONMENT and k not in (VERBOSE, "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["FUSIONREC_HOME"] = str(tmp_path / "home")
    fusionrec = str(BIN / "fusionrec")
    shop, features = str(tiny_shop), str(features)
    # The Makefile's demo, smaller, to stay near a minute and a half: `models prepare` and `encode` left
    # out (real encoders, a minute), the two `train` runs (40 s each; the same Ray Train, MLflow
    # logging and registering that tune's trials and its --register go through) and `runs` (it lists
    # `train` runs only).
    commands = [
        [fusionrec, "data", "validate", shop],
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
