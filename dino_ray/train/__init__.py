"""Training building blocks. Import the submodules directly (kept import-light on purpose):

- ``dino_ray.train.schedules``: per-iteration lr / wd / momentum / teacher-temperature schedules.
- ``dino_ray.train.param_groups``: optimizer groups with lr / wd multipliers and ``apply_schedules``.
- ``dino_ray.train.ssl_arch``: ``SSLModel`` (student or teacher) and ``SSLObjective`` (DINO + iBOT + KoLeo).
- ``dino_ray.train.ema``: EMA teacher update on parameter lists or ZeRO-3 shards.
"""
