"""Layout of a packed token tensor: several resolution groups flattened into one [rows, C] matrix.

Multi-crop training feeds crops of different sizes (e.g. 2x224 and 8x98 px) through the same blocks.
Keeping every token in one flat matrix lets the token-wise layers (norms, linears, MLP) run as a single
GEMM over all crops, while attention, which must stay inside each image, splits the matrix back into
[batch, tokens, C] views per group. This module only describes that split; it owns no parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenGroups:
    """Per-group ``(batch, tokens)`` sizes, in the order the groups are stacked in the flat tensor."""

    shapes: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.shapes:
            raise ValueError("TokenGroups needs at least one group")
        for batch, tokens in self.shapes:
            if batch < 0 or tokens < 1:
                raise ValueError(f"invalid group shape (batch={batch}, tokens={tokens})")

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> TokenGroups:
        """The layout of a list of [B, T, C] tensors.

        Sizes are kept as the tensors report them (plain ints in eager mode) rather than cast with
        ``int()``: under ``torch.export`` a cast would freeze the batch size into the exported graph."""
        return cls(tuple((t.shape[0], t.shape[1]) for t in tensors))

    @property
    def rows(self) -> tuple[int, ...]:
        """Number of flat rows each group occupies."""
        return tuple(b * t for b, t in self.shapes)

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views [B, T, C] of each group inside ``flat`` [rows, C] (no copy)."""
        if flat.shape[0] != self.total_rows:
            raise ValueError(f"flat tensor has {flat.shape[0]} rows, layout {self.shapes} needs {self.total_rows}")
        chunks = torch.split(flat, list(self.rows), dim=0)
        return [c.view(b, t, *flat.shape[1:]) for c, (b, t) in zip(chunks, self.shapes)]

    @staticmethod
    def pack(tensors: Sequence[Tensor]) -> Tensor:
        """Flatten [B, T, C] (or already flat [B*T, C]) tensors into one [rows, C] matrix.

        A single group is only reshaped, so the unpacked single-tensor path pays no copy."""
        flats = [t.reshape(-1, t.shape[-1]) for t in tensors]
        return flats[0] if len(flats) == 1 else torch.cat(flats, dim=0)
