"""JSON schema of the KubeRay custom resources (ray.io/v1) as fusionrec's manifests use them.

Only the fields we use, with `additionalProperties: false` everywhere: the API server would keep
or drop an unknown field silently, so a misspelt one must fail here. Field names and types follow
KubeRay v1.7.0's CRDs (ray-operator/config/crd/bases), and the cross-field rules are KubeRay's own
(ray-operator/controllers/ray/utils/validation.go). Pod templates refer to the Kubernetes
PodTemplateSpec schema that kubernetes-validate ships (POD_TEMPLATE_URI, resolved by the caller).
"""

from __future__ import annotations

POD_TEMPLATE_URI = "https://kubernetes.io/api/podtemplatespec/v1"
INCREMENTAL_UPGRADE = "NewClusterWithIncrementalUpgrade"


def _object(properties: dict, required: tuple[str, ...] = (), **rules) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required),
            **rules}


_STRING = {"type": "string"}
_BOOL = {"type": "boolean"}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_POSITIVE = {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
_PERCENT = {"type": "integer", "minimum": 0, "maximum": 100}
_STRING_MAP = {"type": "object", "additionalProperties": _STRING}
_DNS_LABEL = {"type": "string", "pattern": "^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"}
_TEMPLATE = {"$ref": POD_TEMPLATE_URI}
_METADATA = _object({"name": _DNS_LABEL, "namespace": _STRING, "labels": _STRING_MAP, "annotations": _STRING_MAP},
                    ("name",))

_HEAD = _object({
    "rayStartParams": _STRING_MAP,
    "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    "template": _TEMPLATE,
}, ("template",))
_WORKER_GROUP = _object({
    "groupName": _DNS_LABEL,
    "replicas": _INT32,
    "minReplicas": _INT32,
    "maxReplicas": _INT32,
    "idleTimeoutSeconds": _INT32,
    "rayStartParams": _STRING_MAP,
    "template": _TEMPLATE,
}, ("groupName", "minReplicas", "maxReplicas", "template"))
_AUTOSCALER = _object({
    "idleTimeoutSeconds": _INT32,
    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
    "version": {"enum": ["v1", "v2"]},
})


def _cluster(ray_version: str) -> dict:
    """A RayClusterSpec; rayVersion must name the Ray that the image carries."""
    return _object({
        "rayVersion": {"const": ray_version},
        "enableInTreeAutoscaling": _BOOL,
        "autoscalerOptions": _AUTOSCALER,
        "headGroupSpec": _HEAD,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    }, ("rayVersion", "headGroupSpec"))


def _resource(kind: str, spec: dict) -> dict:
    return _object({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": _METADATA,
                    "spec": spec}, ("apiVersion", "kind", "metadata", "spec"))


def ray_schemas(ray_version: str) -> dict[str, dict]:
    """Kind -> JSON schema (draft 2020-12) for RayCluster, RayJob and RayService."""
    cluster = _cluster(ray_version)
    job = _object({
        "entrypoint": {"type": "string", "minLength": 1},
        "rayClusterSpec": cluster,
        "shutdownAfterJobFinishes": _BOOL,
        "ttlSecondsAfterFinished": _INT32,
        "activeDeadlineSeconds": _POSITIVE,
        "backoffLimit": _INT32,
        "suspend": _BOOL,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "runtimeEnvYAML": _STRING,
        "entrypointNumCpus": {"type": "number", "minimum": 0},
        "entrypointNumGpus": {"type": "number", "minimum": 0},
    }, ("entrypoint", "rayClusterSpec"),
        # KubeRay refuses to suspend a job whose cluster would outlive it.
        **{"if": {"properties": {"suspend": {"const": True}}, "required": ["suspend"]},
           "then": {"properties": {"shutdownAfterJobFinishes": {"const": True}},
                    "required": ["shutdownAfterJobFinishes"]}})
    upgrade = _object({
        "type": {"enum": [INCREMENTAL_UPGRADE, "NewCluster", "None"]},
        "clusterUpgradeOptions": _object({
            "gatewayClassName": {"type": "string", "minLength": 1},
            "maxSurgePercent": _PERCENT,
            "stepSizePercent": _PERCENT,
            "intervalSeconds": _POSITIVE,
        }, ("gatewayClassName", "stepSizePercent", "intervalSeconds")),
    })
    service = _object({
        "serveConfigV2": {"type": "string", "minLength": 1},
        "rayClusterConfig": cluster,
        "upgradeStrategy": upgrade,
        "excludeHeadPodFromServeSvc": _BOOL,
        "rayClusterDeletionDelaySeconds": _INT32,
    }, ("serveConfigV2", "rayClusterConfig"),
        # The incremental upgrade scales the new cluster through the Ray autoscaler, in steps.
        **{"if": {"properties": {"upgradeStrategy": {"properties": {"type": {"const": INCREMENTAL_UPGRADE}},
                                                     "required": ["type"]}},
                  "required": ["upgradeStrategy"]},
           "then": {"properties": {"upgradeStrategy": {"required": ["clusterUpgradeOptions"]},
                                   "rayClusterConfig": {"properties": {"enableInTreeAutoscaling": {"const": True}},
                                                        "required": ["enableInTreeAutoscaling"]}}}})
    return {"RayCluster": _resource("RayCluster", cluster), "RayJob": _resource("RayJob", job),
            "RayService": _resource("RayService", service)}
