"""Offline checks of the KubeRay deployment in ``cluster/``: CRD schemas plus what no schema can say.

Why this exists: the API server silently prunes a misspelled RayJob field (``shutdownAfterJobFinish``),
a GPU worker group without ``nvidia.com/gpu`` limits happily schedules on CPU nodes, an entrypoint
naming a job YAML that is not in the image fails only after the cluster has come up, and an inline
secret ends up in git. No Kubernetes cluster exists on the dev machines, so all of it is checked here:

* every ``ray.io/v1`` document against the KubeRay v1.7.0 CRD ``openAPIV3Schema`` of its kind, in
  kubeconform's strict sense (``schema``); the core kinds we ship (Deployment, Job, Service, PVC, Secret,
  ConfigMap) against the pod/service/PVC schemas embedded in the same CRDs (``core_kinds``);
* our own rules (``rules/``): entrypoints name a job YAML that exists, one image and one Ray version
  across the manifests, the Dockerfile and pyproject, an image tag that names the commit, GPU groups
  request and tolerate GPUs, no secret values inline, nothing exposes the dashboard, resumable RayJobs
  (fixed names and output root), ``kubectl apply -f cluster/`` neither overwrites a Secret nor starts a
  job (``apply_safety``), and the operator-side rules the CRD leaves to CEL or to the controller
  (``submissionMode``, ``managedBy``, deletion strategy, autoscaler v2 restart policy, token auth Ray
  version, name lengths).

The checked directory is read with its sub-folders (``cluster/jobs/``) and its Secret templates
(``*.yaml.template``).

Not checked (needs a live cluster): admission webhooks, node capacity, image pull, RBAC, quota.

CLI: ``python -m dino_ray.cluster_check cluster/`` prints ``OK`` or one line per problem (exit 1).
"""

from .check import check_cluster
from .cli import main
from .dockerfile import Instruction, dockerfile_facts, parse_dockerfile
from .entrypoint import JobCommand, parse_entrypoint
from .errors import ClusterCheckError
from .manifests import Manifest, load_manifests
from .report import Problem, Report
from .schema import crd_schema, schema_validator, validate_schema

__all__ = [
    "ClusterCheckError", "Instruction", "JobCommand", "Manifest", "Problem", "Report", "check_cluster",
    "crd_schema", "dockerfile_facts", "load_manifests", "main", "parse_dockerfile", "parse_entrypoint",
    "schema_validator", "validate_schema",
]
