"""The checks no schema can express, one concern a module; each returns a list of Problems.

Per-manifest rules take a :class:`~dino_ray.cluster_check.manifests.Manifest`; cross-file rules take
all manifests plus the parsed Dockerfile and pyproject facts. ``check.py`` decides the order.
"""
