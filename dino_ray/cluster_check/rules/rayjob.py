"""RayJob rules the CRD leaves to CEL or to the operator, plus what makes a failed run resumable."""

from __future__ import annotations

from ..manifests import Manifest
from ..ray_spec import runtime_env
from ..report import Problem

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
MANAGED_BY = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")


def _deletion_strategy_problems(m: Manifest) -> list[Problem]:
    strategy = m.spec.get("deletionStrategy")
    if not isinstance(strategy, dict):
        return []
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    rules = bool(strategy.get("deletionRules"))
    if legacy and rules:
        return [m.problem("spec.deletionStrategy", "onSuccess/onFailure and deletionRules cannot be combined")]
    if not rules and not ("onSuccess" in strategy and "onFailure" in strategy):
        return [m.problem("spec.deletionStrategy", "needs both onSuccess and onFailure, or deletionRules")]
    if rules and m.spec.get("shutdownAfterJobFinishes"):
        return [m.problem("spec.deletionStrategy", "deletionRules and shutdownAfterJobFinishes are exclusive")]
    return []


def _retry_problems(m: Manifest, mode: str) -> list[Problem]:
    """A failed run must be retried (a backoffLimit) so it resumes from what output_root already holds."""
    spec, problems = m.spec, []
    backoff = spec.get("backoffLimit")
    if not isinstance(backoff, int) or isinstance(backoff, bool) or backoff < 0:
        problems.append(m.problem("spec.backoffLimit", f"set a non-negative backoffLimit (got {backoff!r}) so a "
                                                       "failed run is retried and resumes from output_root"))
    elif mode == "InteractiveMode" and backoff > 0:
        problems.append(m.problem("spec.backoffLimit", "InteractiveMode does not allow retries"))
    return problems


def _cluster_choice_problems(m: Manifest, mode: str) -> list[Problem]:
    spec, problems = m.spec, []
    if bool(spec.get("rayClusterSpec")) == bool(spec.get("clusterSelector")):
        problems.append(m.problem("spec", "set exactly one of rayClusterSpec and clusterSelector"))
    if spec.get("clusterSelector") and mode == "SidecarMode":
        problems.append(m.problem("spec.clusterSelector", "SidecarMode cannot target an existing cluster"))
    return problems


def rayjob_problems(m: Manifest) -> list[Problem]:
    spec, problems = m.spec, []
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        problems.append(m.problem("spec.submissionMode", f"{mode!r} is not one of {', '.join(SUBMISSION_MODES)}"))
    if "managedBy" in spec and spec["managedBy"] not in MANAGED_BY:
        problems.append(m.problem("spec.managedBy", f"{spec['managedBy']!r} is not one of {', '.join(MANAGED_BY)}"))
    if spec.get("rayClusterSpec") and spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(m.problem("spec.shutdownAfterJobFinishes", "must be true: the job brings up its own "
                                                                   "cluster and must release its GPUs"))
    problems += _retry_problems(m, mode) + _cluster_choice_problems(m, mode)
    job_id = spec.get("jobId")
    if not isinstance(job_id, str) or not job_id or "$" in job_id:
        problems.append(m.problem("spec.jobId", "set a fixed submission id so a retry is the same job"))
    if "runtimeEnvYAML" in spec and not isinstance(runtime_env(m), dict):
        problems.append(m.problem("spec.runtimeEnvYAML", "must be a string holding a YAML mapping"))
    return problems + _deletion_strategy_problems(m)
