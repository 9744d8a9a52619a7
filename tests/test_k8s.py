"""`fusionrec k8s validate|render`, offline and without Ray: the committed k8s/ passes, every error
planted in a copy of it fails with one line naming it, `FILE: KIND/NAME: path.to.field: message`, and
a kustomization that `kubectl kustomize` cannot build, or no kubectl, fails with one line `error: ...`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fusionrec.cli import app
from fusionrec.ops.k8s import _kubectl_error

REPO = Path(__file__).resolve().parents[1]
PROBLEM = re.compile(r"^\S+: \S+: \S+: .+$")  # FILE: KIND/NAME: path.to.field: message
# The Ranker's bounds and target, in serve/config.yaml and the manifest (the Encoder's target is 2)
RANKER_SCALING = "min_replicas: 1\n          max_replicas: 2\n          target_ongoing_requests: 1"

runner = CliRunner()


@pytest.fixture
def kubectl() -> None:
    """validate builds every kustomization with kubectl's kustomize (installed on CI)."""
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl (with kustomize) on PATH")


@pytest.fixture
def tree(tmp_path: Path, kubectl) -> Path:
    """A copy of k8s/ and of serve/config.yaml to plant errors in."""
    shutil.copytree(REPO / "k8s", tmp_path / "k8s")
    shutil.copy(REPO / "serve" / "config.yaml", tmp_path / "serve.yaml")
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def k8s(command: str, tree: Path):
    return runner.invoke(app, ["k8s", command, str(tree / "k8s"), "--serve-config", str(tree / "serve.yaml")])


def problems(tree: Path) -> list[str]:
    """The problem lines of a failing `fusionrec k8s validate`, checked for their form."""
    result = k8s("validate", tree)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "error:" not in result.output
    lines = result.stdout.splitlines()
    assert lines and all(PROBLEM.match(line) for line in lines), lines
    return lines


def kustomize_fails(tree: Path, folder: str) -> str:
    """The one line of a `fusionrec k8s validate` that stops at kustomize's error in `folder`: its message."""
    result = k8s("validate", tree)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.splitlines()
    prefix = f"error: {tree / 'k8s' / folder}: kubectl kustomize failed: "
    assert len(lines) == 1 and lines[0].startswith(prefix) and '"command failed"' not in lines[0], lines
    return lines[0].removeprefix(prefix)


def test_committed_tree_is_valid(monkeypatch, kubectl):
    monkeypatch.chdir(REPO)
    result = runner.invoke(app, ["k8s", "validate", "k8s/"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok k8s: ") and "(base, overlays/dev, overlays/prod)" in result.stdout
    assert "RayCluster" in result.stdout and "RayJob" in result.stdout and "RayService" in result.stdout


@pytest.mark.parametrize("file, old, new, expected", [
    ("base/rayjob-train.yaml", "ttlSecondsAfterFinished:", "ttlSecondsAfterFinish:",
     "base/rayjob-train.yaml: RayJob/fusionrec-train: spec.ttlSecondsAfterFinish: unknown field "
     "(did you mean 'ttlSecondsAfterFinished'?)"),
    ("base/raycluster.yaml", "enableInTreeAutoscaling:", "enableInTreeAutoscale:",
     "base/raycluster.yaml: RayCluster/fusionrec: spec.enableInTreeAutoscale: unknown field "
     "(did you mean 'enableInTreeAutoscaling'?)"),
    ("base/raycluster.yaml", "              resources:", "              resource:",  # in a pod template
     "base/raycluster.yaml: RayCluster/fusionrec: spec.workerGroupSpecs[0].template.spec.containers[0].resource: "
     "unknown field (did you mean 'resources'?)"),
    ("base/mlflow.yaml", "  strategy:", "  stratgy:",
     "base/mlflow.yaml: Deployment/fusionrec-mlflow: spec.stratgy: unknown field (did you mean 'strategy'?)"),
], ids=["rayjob", "raycluster", "pod-template", "deployment"])
def test_misspelt_field(tree, file, old, new, expected):
    edit(tree / "k8s" / file, old, new)
    assert any(line.endswith(expected) for line in problems(tree))


@pytest.mark.parametrize("file, old, new, expected", [
    ("base/raycluster.yaml", "      replicas: 1", "      replicas: two",
     "base/raycluster.yaml: RayCluster/fusionrec: spec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"),
    ("base/rayjob-encode.yaml", "suspend: true", "suspend: yes please",
     "base/rayjob-encode.yaml: RayJob/fusionrec-encode: spec.suspend: 'yes please' is not of type 'boolean'"),
    ("base/mlflow.yaml", "  replicas: 1", "  replicas: one",
     "base/mlflow.yaml: Deployment/fusionrec-mlflow: spec.replicas: 'one' is not of type 'integer', 'null'"),
    ("base/rayjob-train.yaml", "    working_dir: /app", "    - working_dir /app",
     "base/rayjob-train.yaml: RayJob/fusionrec-train: spec.runtimeEnvYAML: not a mapping (a Ray runtime_env)"),
], ids=["raycluster", "rayjob", "deployment", "runtime-env"])
def test_wrong_type(tree, file, old, new, expected):
    edit(tree / "k8s" / file, old, new)
    assert any(line.endswith(expected) for line in problems(tree))


def test_incremental_upgrade_needs_the_autoscaler(tree):
    edit(tree / "k8s" / "base" / "rayservice.yaml", "enableInTreeAutoscaling: true", "enableInTreeAutoscaling: false")
    assert any(line.endswith("RayService/fusionrec: spec.rayClusterConfig.enableInTreeAutoscaling: True was expected")
               for line in problems(tree))


def test_render_then_validate(tree):
    """render rewrites only the serveConfigV2 block, from the Serve config it is given."""
    manifest = tree / "k8s" / "base" / "rayservice.yaml"
    before = manifest.read_text()
    edit(tree / "serve.yaml", RANKER_SCALING, RANKER_SCALING.replace("max_replicas: 2", "max_replicas: 5"))
    result = k8s("render", tree)
    assert result.exit_code == 0 and result.stdout.startswith(f"rendered {manifest}"), result.output
    after = manifest.read_text()
    changed = [line for line in after.splitlines() if line not in before.splitlines()]
    assert sorted(line.strip() for line in changed) == [f"# Generated by `fusionrec k8s render` from "
                                                        f"{tree / 'serve.yaml'}: edit that file and render again.",
                                                        "max_replicas: 5"]
    service = next(doc for doc in yaml.safe_load_all(after) if doc["kind"] == "RayService")
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert served["http_options"]["host"] == "0.0.0.0" and served["proxy_location"] == "EveryNode"
    assert k8s("validate", tree).exit_code == 0


def test_drift_from_serve_config(tree):
    """serve/config.yaml edited without `fusionrec k8s render`: the base and both overlays are stale."""
    edit(tree / "serve.yaml", RANKER_SCALING, RANKER_SCALING.replace("max_replicas: 2", "max_replicas: 5"))
    assert problems(tree) == [
        f"{tree / 'k8s' / file}: RayService/fusionrec: spec.serveConfigV2.applications[0].deployments[1]"
        f".autoscaling_config.max_replicas: differs from {tree / 'serve.yaml'} (2 here, 5 rendered): "
        "run `fusionrec k8s render`"
        for file in ("base/rayservice.yaml", "overlays/dev/kustomization.yaml", "overlays/prod/kustomization.yaml")]


def test_drift_in_the_manifest(tree):
    """A hand edit of the generated block fails too, in the base and in every overlay built on it."""
    edit(tree / "k8s" / "base" / "rayservice.yaml", RANKER_SCALING,
         RANKER_SCALING.replace("max_replicas: 2", "max_replicas: 4"))
    lines = problems(tree)
    assert len(lines) == 3 and all("differs from" in line and "(4 here, 2 rendered)" in line for line in lines)
    assert {line.split(": ")[0] for line in lines} == {
        str(tree / "k8s" / path) for path in ("base/rayservice.yaml", "overlays/dev/kustomization.yaml",
                                              "overlays/prod/kustomization.yaml")}


@pytest.mark.parametrize("old, new, expected", [
    ("name: Ranker", "name: Rankr", "spec.serveConfigV2.applications[0].deployments[1].name: unknown deployment "
                                    "'Rankr': application fusionrec.serve.app:build has Ranker, Encoder"),
    (RANKER_SCALING, RANKER_SCALING.replace("min_replicas: 1", "min_replicas: 4"),
     "spec.serveConfigV2.applications[0].deployments[1].autoscaling_config: Value error, max_replicas (2) must be "
                                                       "greater than or equal to min_replicas (4)!"),
    ("upscale_delay_s: 1", "upscale_delay: 1", "spec.serveConfigV2.applications[0].deployments[1]"
                                               ".autoscaling_config.upscale_delay: unknown field "
                                               "(did you mean 'upscale_delay_s'?)"),
    ("max_ongoing_requests: 32", "max_ongoing_requests: lots",
     "spec.serveConfigV2.applications[0].deployments[1].max_ongoing_requests: Input should be a valid integer, "
     "unable to parse string as an integer"),
], ids=["unknown-deployment", "bad-autoscaling", "misspelt-autoscaling", "serve-schema"])
def test_bad_serve_config(tree, old, new, expected):
    """Rendered from a bad Serve config, so nothing drifts: only the planted error is reported."""
    edit(tree / "serve.yaml", old, new)
    assert k8s("render", tree).exit_code == 0
    lines = problems(tree)
    assert all(line.endswith(expected) for line in lines) and len(lines) == 3  # base, dev, prod
    assert lines[0].startswith(f"{tree / 'k8s/base/rayservice.yaml'}: RayService/fusionrec: ")


@pytest.mark.parametrize("file, old, new, expected", [
    ("overlays/prod/kustomization.yaml", "        value: 8\n", "        value: eight\n",
     "overlays/prod/kustomization.yaml: RayCluster/fusionrec: spec.workerGroupSpecs[0].maxReplicas: 'eight' is not "
     "of type 'integer'"),
    ("overlays/dev/small.yaml", "accessModes: [ReadWriteOnce]", "accessModes: [ReadWriteOnce, 7]",
     "overlays/dev/kustomization.yaml: PersistentVolumeClaim/fusionrec-data: spec.accessModes[1]: 7 is not of type "
     "'string', 'null'"),
], ids=["json6902-value", "merge-patch-value"])
def test_invalid_overlay_output(tree, file, old, new, expected):
    """kustomize builds it; what it builds is invalid, and named by the overlay that made it so."""
    edit(tree / "k8s" / file, old, new)
    lines = problems(tree)
    assert [line for line in lines if line.endswith(expected)] and len(lines) == 1, lines


@pytest.mark.parametrize("file, old, new, folder, expected", [
    ("overlays/prod/kustomization.yaml", "/spec/workerGroupSpecs/0/maxReplicas", "/spec/workerGroupSpecs/7/maxReplicas",
     "overlays/prod", "replace operation does not apply: doc is missing path: /spec/workerGroupSpecs/7/maxReplicas"),
    ("overlays/dev/kustomization.yaml", "  - ../../base", "  - ../../bsae", "overlays/dev",
     "accumulating resources from '../../bsae'"),
    ("overlays/dev/kustomization.yaml", "patches:", "pathces:", "overlays/dev",
     'invalid Kustomization: json: unknown field "pathces"'),
    ("overlays/dev/small.yaml", "name: fusionrec-mlflow", "name: fusionrec-mlflo", "overlays/dev",
     'no resource matches strategic merge patch "PersistentVolumeClaim.v1.[noGrp]/fusionrec-mlflo.[noNs]"'),
    ("overlays/dev/small.yaml", "accessModes: [ReadWriteOnce]", "accessModes: ReadWriteOnce", "overlays/dev",
     "wrong node kind: expected SequenceNode but got ScalarNode: node contents: ReadWriteOnce"),
], ids=["json6902-path", "missing-resource", "unknown-field", "unmatched-merge-patch", "merge-patch-type"])
def test_broken_kustomization(tree, file, old, new, folder, expected):
    edit(tree / "k8s" / file, old, new)
    assert expected in kustomize_fails(tree, folder)


def test_resource_no_overlay_changes_is_reported_once(tree):
    edit(tree / "k8s" / "base" / "mlflow.yaml", "targetPort: http", "targetPrt: http")
    assert problems(tree) == [f"{tree / 'k8s/base/mlflow.yaml'}: Service/fusionrec-mlflow: spec.ports[0].targetPrt: "
                              "unknown field (did you mean 'targetPort'?)"]


def test_not_yaml(tree):
    """Reported once, by the base (the first kustomization built), though both overlays build on it."""
    edit(tree / "k8s" / "base" / "raycluster.yaml", "  rayVersion:", "\trayVersion:")
    assert kustomize_fails(tree, "base").endswith("MalformedYAMLError: yaml: line 13: found character that cannot "
                                                  "start any token in File: raycluster.yaml")


def test_not_yaml_outside_kustomizations(tree):
    (tree / "k8s" / "extra.yaml").write_text("kind: ConfigMap\n\tdata: {}\n")
    lines = problems(tree)
    assert len(lines) == 1 and lines[0].startswith(f"{tree / 'k8s/extra.yaml'}: -: -: not YAML: ")


def test_without_kubectl(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder
    result = runner.invoke(app, ["k8s", "validate", "k8s/"])
    assert result.exit_code == 1 and result.output == ("error: fusionrec k8s validate needs kubectl (with kustomize) "
                                                       "on PATH: not found\n")


def test_missing_serve_config(tree):
    (tree / "serve.yaml").unlink()
    result = k8s("validate", tree)
    assert result.exit_code == 1 and result.output.strip() == f"error: {tree / 'serve.yaml'}: no such Serve config"


@pytest.mark.parametrize("stderr, message", [
    ('E1205 16:59:53.100052   12409 run.go:72] "command failed" err="invalid Kustomization: json: unknown field '
     '\\"pathces\\""\n', 'invalid Kustomization: json: unknown field "pathces"'),
    ('E1205 16:59:52.691927   12394 run.go:72] "command failed" err=<\n\twrong node kind: expected SequenceNode but '
     'got ScalarNode: node contents:\n\tReadWriteOnce\n >\n',
     "wrong node kind: expected SequenceNode but got ScalarNode: node contents: ReadWriteOnce"),
    ("# Warning: 'commonLabels' is deprecated. Please use 'labels' instead.\nerror: accumulating resources: "
     "no such file\n", "accumulating resources: no such file"),
], ids=["klog-quoted", "klog-block", "plain"])
def test_kubectl_error_on_one_line(stderr, message):
    """kubectl's error however this kubectl build prints it: klog's (kubectl 1.32 here) or `error: ...`."""
    assert _kubectl_error(stderr) == message
