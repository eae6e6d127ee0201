"""What ``kubectl apply -f cluster/`` would do: nothing that overwrites a Secret or starts a job.

kubectl applies every ``*.yaml``, ``*.yml`` and ``*.json`` of a directory (only its top level without
``-R``). A Secret template there would replace the real Secrets with placeholders, and RayJobs there
would all start at once, each on its own cluster, on one shared output root. So Secret templates keep
a ``.yaml.template`` suffix (kubectl never reads it, even with ``-R``) and jobs live in ``jobs/``,
applied one at a time by name.
"""

from __future__ import annotations

from ..manifests import KUBECTL_SUFFIXES, TEMPLATE_SUFFIX, Manifest
from ..report import Problem

JOB_KINDS = ("RayJob", "Job", "CronJob")


def apply_safety_problems(m: Manifest) -> list[Problem]:
    if m.kind == "Secret" and m.path.name.endswith(KUBECTL_SUFFIXES):
        return [m.problem("kind", f"a Secret template in a file kubectl applies would overwrite the real Secret "
                                  f"with placeholders; name the file *{TEMPLATE_SUFFIX}")]
    if m.kind in JOB_KINDS and m.kubectl_applies_with_directory:
        return [m.problem("kind", f"`kubectl apply -f {m.root.name if m.root else 'cluster'}/` would start this "
                                  f"{m.kind} together with everything else there; move it to jobs/ and apply it "
                                  "by name")]
    return []
