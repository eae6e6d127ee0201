"""DINOv2 objectives: DINO (CLS), iBOT (masked patches), KoLeo, and teacher centering.

Import from the submodules (``dino_ray.losses.dino``, ``.ibot``, ``.koleo``, ``.centering``, ``.config``):
this package imports nothing, so ``dino_ray.losses.config`` (read by the job config) needs no torch.
"""
