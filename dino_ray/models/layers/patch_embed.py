"""Image to patch tokens: a strided convolution whose kernel equals the patch size."""

from __future__ import annotations

from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Cuts [B, C, H, W] images into non-overlapping patches and projects each to ``embed_dim``.

    The parameter lives in ``proj`` (a Conv2d) so the state-dict keys match the released DINOv2
    checkpoints (``patch_embed.proj.weight`` / ``.bias``)."""

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) of an image; sizes that do not tile exactly are refused rather than
        silently cropped, because a dropped border shifts every downstream patch feature."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}; "
                             f"resize or crop to e.g. {height // p * p}x{width // p * p}")
        return height // p, width // p

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got shape {tuple(images.shape)}")
        self.grid(images.shape[-2], images.shape[-1])
        return self.proj(images).flatten(2).transpose(1, 2)
