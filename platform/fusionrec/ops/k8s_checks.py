"""The checks `fusionrec k8s validate` runs on each resource kustomize builds (fusionrec.ops.k8s):

- core kinds (Deployment, Service, PersistentVolumeClaim, ...) against kubernetes-validate's strict
  schemas (unknown fields fail);
- RayCluster / RayJob / RayService against fusionrec.ops.k8s_schema (the KubeRay fields we use, nothing
  else), their pod templates against the PodTemplateSpec schema that kubernetes-validate ships;
- each serveConfigV2 with Ray Serve's ServeDeploySchema and AutoscalingConfig (plus unknown fields,
  which Serve would ignore), its deployments against the application's, and against what `render`
  makes of serve/config.yaml (`cluster_serve_config`), so the two cannot drift.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import typing
from importlib import metadata, resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

from fusionrec.ops.k8s_schema import ray_schemas


def _field(parts: typing.Iterable[object]) -> str:
    """("spec", "workerGroupSpecs", 0, "replicas") -> "spec.workerGroupSpecs[0].replicas"."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "-"


def cluster_serve_config(serve_config: Path) -> dict:
    """serve/config.yaml as a RayService runs it: a proxy on every pod, listening on the pod's address
    (KubeRay's serve Service sends traffic to the pod IP, never to its loopback)."""
    if not Path(serve_config).is_file():
        raise FileNotFoundError(f"{serve_config}: no such Serve config")
    try:
        raw = yaml.safe_load(Path(serve_config).read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{serve_config}: not YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{serve_config}: not a Serve config (a mapping with `applications`)")
    http = raw.get("http_options") if isinstance(raw.get("http_options"), dict) else {}
    return {**raw, "proxy_location": "EveryNode", "http_options": {**http, "host": "0.0.0.0"}}


def _unknown_field(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown field{f' (did you mean {close[0]!r}?)' if close else ''}"


def _describe(error) -> list[tuple[str, str]]:
    """A jsonschema error as (field, message) lines; an unknown field is named by its own path."""
    if error.context:
        error = best_match(error.context)
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        return [(_field(path + (key,)), _unknown_field(key, known)) for key in error.instance if key not in known]
    return [(_field(path), error.message)]


def _model_in(annotation: object) -> type | None:
    """The first pydantic model in a field's annotation (Optional[X], List[X], Union[Dict, X]...)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for arg in typing.get_args(annotation) if (model := _model_in(arg))), None)


def _pydantic_unknown(model: type, data: object, path: tuple) -> list[tuple[str, str]]:
    """Keys that a Ray Serve schema would ignore silently, at every level of the config it describes."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = {**{name: name for name in fields}, **{f.alias: name for name, f in fields.items() if f.alias}}
    found = [(_field(path + (key,)), _unknown_field(key, names)) for key in data if key not in names]
    for key, name in names.items():
        inner, value = _model_in(fields[name].annotation), data.get(key)
        if inner is not None and isinstance(value, dict):
            found += _pydantic_unknown(inner, value, path + (key,))
        elif inner is not None and isinstance(value, list):
            for i, item in enumerate(value):
                found += _pydantic_unknown(inner, item, path + (key, i))
    return found


def _pydantic_errors(exc, path: tuple) -> list[tuple[str, str]]:
    return [(_field(path + tuple(error["loc"])), error["msg"]) for error in exc.errors()]


def _application_deployments(import_path: object) -> tuple[str, ...] | None:
    """The deployments of the application behind `import_path` when it is fusionrec's (else None):
    the DEPLOYMENTS of fusionrec.serve.app, read from its source, because importing it loads torch (~8 s)."""
    module = "fusionrec.serve.app"
    if import_path != f"{module}:build":
        return None
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "DEPLOYMENTS" for t in node.targets))


def _difference(here: object, there: object, path: tuple = ()) -> tuple[tuple, object, object] | None:
    """The first place where two parsed YAML values differ, with both values there."""
    if isinstance(here, dict) and isinstance(there, dict):
        for key in [*here, *(k for k in there if k not in here)]:
            if key not in here or key not in there:
                return path + (key,), here.get(key, "absent"), there.get(key, "absent")
            if found := _difference(here[key], there[key], path + (key,)):
                return found
        return None
    if isinstance(here, list) and isinstance(there, list) and len(here) == len(there):
        for i, (a, b) in enumerate(zip(here, there, strict=True)):
            if found := _difference(a, b, path + (i,)):
                return found
        return None
    return None if here == there else (path, here, there)


def _runtime_env(text: str) -> list[tuple[str, str]]:
    """KubeRay refuses a RayJob whose runtimeEnvYAML is not a YAML mapping (Ray's runtime_env)."""
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [("spec.runtimeEnvYAML", f"not YAML: {' '.join(str(exc).split())}")]
    return [] if isinstance(env, dict) else [("spec.runtimeEnvYAML", "not a mapping (a Ray runtime_env)")]


class Checker:
    """Validates one resource at a time; built once (schemas, the rendered Serve config)."""

    def __init__(self, serve_config: Path):
        self.k8s_version = kubernetes_validate.latest_version()
        folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{self.k8s_version}-local-strict"
        registry = Registry().with_resources(
            (schema["$id"], Resource.from_contents(schema))
            for schema in (json.loads((folder / name).read_text()) for name in ("_definitions.json",
                                                                                "podtemplatespec-v1.json")))
        self.ray = {kind: jsonschema.Draft202012Validator(schema, registry=registry)
                    for kind, schema in ray_schemas(metadata.version("ray")).items()}
        self.serve_config = serve_config
        self.rendered = cluster_serve_config(serve_config)

    def check(self, doc: dict) -> list[tuple[str, str]]:
        """(field, message) for each problem in one resource."""
        if not isinstance(doc.get("apiVersion"), str) or not isinstance(doc.get("kind"), str):
            return [("-", "not a Kubernetes resource: apiVersion and kind are required")]
        if doc["apiVersion"].split("/")[0] == "ray.io":
            validator = self.ray.get(doc["kind"])
            if validator is None:
                return [("kind", f"fusionrec has no schema for {doc['kind']} (known: {', '.join(self.ray)})")]
            errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
            found = [line for error in errors for line in _describe(error)]
            spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
            if doc["kind"] == "RayService" and isinstance(spec.get("serveConfigV2"), str):
                found += self._serve_config(spec["serveConfigV2"])
            if doc["kind"] == "RayJob" and isinstance(spec.get("runtimeEnvYAML"), str):
                found += _runtime_env(spec["runtimeEnvYAML"])
            return found
        try:
            kubernetes_validate.validate(doc, self.k8s_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            return [("apiVersion", exc.message)]
        except kubernetes_validate.ValidationError as exc:
            return _describe(exc)
        return []

    def _serve_config(self, text: str) -> list[tuple[str, str]]:
        from pydantic import ValidationError
        from ray.serve.config import AutoscalingConfig
        from ray.serve.schema import ServeDeploySchema

        where = ("spec", "serveConfigV2")
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            return [(_field(where), f"not YAML: {' '.join(str(exc).split())}")]
        if not isinstance(config, dict):
            return [(_field(where), "not a Serve config (a mapping with `applications`)")]
        try:
            ServeDeploySchema.model_validate(config)
            found = []
        except ValidationError as exc:
            found = _pydantic_errors(exc, where)
        found += _pydantic_unknown(ServeDeploySchema, config, where)
        apps = config.get("applications") if isinstance(config.get("applications"), list) else []
        for a, app in enumerate(a for a in apps if isinstance(a, dict)):
            known = _application_deployments(app.get("import_path"))
            if known is None:
                found.append((_field(where + ("applications", a, "import_path")),
                              f"unknown application {app.get('import_path')!r} "
                              f"(fusionrec's is fusionrec.serve.app:build)"))
            deployments = app.get("deployments") if isinstance(app.get("deployments"), list) else []
            for d, deployment in enumerate(d for d in deployments if isinstance(d, dict)):
                at = where + ("applications", a, "deployments", d)
                if known is not None and deployment.get("name") not in known:
                    found.append((_field(at + ("name",)), f"unknown deployment {deployment.get('name')!r}: "
                                                          f"application {app['import_path']} has {', '.join(known)}"))
                if isinstance(deployment.get("autoscaling_config"), dict):
                    try:
                        AutoscalingConfig.model_validate(deployment["autoscaling_config"])
                    except ValidationError as exc:
                        found += _pydantic_errors(exc, at + ("autoscaling_config",))
        if difference := _difference(config, self.rendered):
            path, here, there = difference
            found.append((_field(where + path), f"differs from {self.serve_config} ({here!r} here, {there!r} "
                                                f"rendered): run `fusionrec k8s render`"))
        return found


