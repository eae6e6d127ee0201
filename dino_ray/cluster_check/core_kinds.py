"""Schemas of the core Kubernetes kinds we ship, with no Kubernetes OpenAPI document at hand.

The RayCluster CRD embeds the full pod template, the head Service and (inside ephemeral volumes)
a PVC spec, all copied from Kubernetes itself; a Deployment, Job, Service, PVC, Secret and ConfigMap
are assembled from those pieces plus the few top-level fields each kind adds.
"""

from __future__ import annotations


def map_of_strings() -> dict:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def obj(required: tuple = (), **props: dict) -> dict:
    """An object schema listing ``props``; strictness is added later, like for the CRDs."""
    schema: dict = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STR = {"type": "string"}
INT_OR_STR = {"anyOf": [INT, STR]}
# CRDs leave metadata open; the API server validates it against ObjectMeta, whose fields we use are these.
OBJECT_META = obj(name=STR, generateName=STR, namespace=STR, labels=map_of_strings(), annotations=map_of_strings())


def _top_level(api_versions: list[str], kind: str, body: dict, required: tuple = ()) -> dict:
    return obj(("apiVersion", "kind", "metadata") + required, apiVersion={"enum": api_versions},
               kind={"enum": [kind]}, metadata=OBJECT_META, **body)


def _deployment_spec(template: dict, selector: dict) -> dict:
    strategy = obj(type={"enum": ["Recreate", "RollingUpdate"]},
                   rollingUpdate=obj(maxSurge=INT_OR_STR, maxUnavailable=INT_OR_STR))
    return obj(("selector", "template"), replicas=INT, selector=selector, template=template, strategy=strategy,
               revisionHistoryLimit=INT, minReadySeconds=INT, progressDeadlineSeconds=INT, paused=BOOL)


def _job_spec(template: dict, selector: dict) -> dict:
    """batch/v1 JobSpec without ``podFailurePolicy`` and ``successPolicy``, which we do not use."""
    return obj(("template",), template=template, selector=selector, manualSelector=BOOL, parallelism=INT,
               completions=INT, completionMode={"enum": ["NonIndexed", "Indexed"]}, backoffLimit=INT,
               backoffLimitPerIndex=INT, maxFailedIndexes=INT, activeDeadlineSeconds=INT,
               ttlSecondsAfterFinished=INT, suspend=BOOL,
               podReplacementPolicy={"enum": ["TerminatingOrFailed", "Failed"]})


def core_schemas(raycluster: dict) -> dict[str, dict]:
    """Schemas by kind, cut out of the (already loaded) RayCluster CRD schema ``raycluster``."""
    head = raycluster["properties"]["spec"]["properties"]["headGroupSpec"]
    template = head["properties"]["template"]
    volumes = template["properties"]["spec"]["properties"]["volumes"]["items"]["properties"]
    pvc_spec = volumes["ephemeral"]["properties"]["volumeClaimTemplate"]["properties"]["spec"]
    service = dict(head["properties"]["headService"])
    service["properties"] = {**service["properties"], "apiVersion": {"enum": ["v1"]},
                             "kind": {"enum": ["Service"]}, "metadata": OBJECT_META}
    service["required"] = ["apiVersion", "kind", "metadata", "spec"]
    data = {"data": map_of_strings(), "immutable": BOOL}
    deployment_spec = _deployment_spec(template, pvc_spec["properties"]["selector"])
    return {
        "Deployment": _top_level(["apps/v1"], "Deployment", {"spec": deployment_spec}, ("spec",)),
        "Job": _top_level(["batch/v1"], "Job", {"spec": _job_spec(template, pvc_spec["properties"]["selector"])},
                          ("spec",)),
        "Service": service,
        "PersistentVolumeClaim": _top_level(["v1"], "PersistentVolumeClaim", {"spec": pvc_spec}, ("spec",)),
        "Secret": _top_level(["v1"], "Secret", {"stringData": map_of_strings(), "type": STR, **data}),
        "ConfigMap": _top_level(["v1"], "ConfigMap", {"binaryData": map_of_strings(), **data}),
    }
