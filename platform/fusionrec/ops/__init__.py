"""Running fusionrec's jobs somewhere: joining or starting Ray (ray_runtime), a local multi-node
cluster and its processes (cluster, processes), jobs submitted to a cluster (jobs), and the
KubeRay manifests in k8s/ (k8s, k8s_checks, k8s_schema). Nothing here knows the model."""
