"""dino-ray: the DINOv2 recipe (curate, pretrain, high-res, distill, eval) as one Ray pipeline."""

__version__ = "0.1.0"
