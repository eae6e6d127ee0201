"""Linear-probe settings, kept free of torch so the job config (``dino_ray.config.schema``) can be
built and validated in well under a second, before any cluster work starts.

Learning-rate grid, code vs paper: the official code's default grid is ``LR_GRID_CODE`` below; the
paper (App. B.3) lists 13 values from 1e-4 to 0.5. Both are multiplied by global batch / 256. We use
the code grid because the released numbers came from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dino_ray.config.fields import Checked, bounded

LR_GRID_CODE: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2,
                                   2e-2, 5e-2, 0.1)


@dataclass(frozen=True)
class LinearGridConfig(Checked):
    """The DINOv2 linear-probe grid: every (learning rate x n_last_blocks x avgpool) head."""

    # Base learning rates (DINOv2 code default); each is scaled by batch_size / 256 like the official
    # eval, so the grid means the same thing at any batch size.
    learning_rates: tuple[float, ...] = bounded(LR_GRID_CODE, gt=0.0)
    # Input layouts: CLS tokens of the last n blocks (1 = final only, 4 = the "linear4" heads) ...
    n_last_blocks: tuple[int, ...] = bounded((1, 4), ge=1)
    # ... with or without the last block's mean patch token appended (both tried, as in DINOv2).
    avgpool: tuple[bool, ...] = (False, True)
    # Passes over the cached features. DINOv2 runs 10 epochs of ImageNet (12,500 iterations).
    epochs: int = bounded(10, ge=1)
    # Minibatch size; DINOv2 uses 128 per GPU. Also sets the LR scale (batch_size / 256).
    batch_size: int = bounded(128, ge=1)
    # SGD momentum, as in the official probe.
    momentum: float = bounded(0.9, ge=0.0, lt=1.0)
    # No weight decay in the official probe: the LR grid and few epochs are the only regularisers.
    weight_decay: float = bounded(0.0, ge=0.0)
    # Head init N(0, init_std) with zero bias (official init; small so early logits are flat).
    init_std: float = bounded(0.01, gt=0.0)
    # None: one past the largest label seen in train/val.
    num_classes: int | None = bounded(None, ge=1)
    # Rows per forward pass when scoring val/test (memory only; no effect on results).
    eval_batch_size: int = bounded(4096, ge=1)
    # Where the heads live ("cpu", "cuda", "cuda:1"); features stay on the host and minibatches
    # are copied over.
    device: str = "cpu"

    def validate(self) -> None:
        for name in ("learning_rates", "n_last_blocks", "avgpool"):
            if not getattr(self, name):
                raise ValueError(f"LinearGridConfig.{name} must list at least one value")

    def scaled_lr(self, lr: float) -> float:
        """The learning rate actually used: the grid value times batch_size / 256."""
        return lr * self.batch_size / 256.0
