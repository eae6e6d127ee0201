"""EMA teacher update on matching lists of tensors.

Works on whatever tensors the trainer hands in: full parameters on a single process, or the local
ZeRO-3 partitions (``p.ds_tensor``) when student and teacher are partitioned identically. In the latter
case the update is shard-local and needs no communication, which is the point of DINOv2's design.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn


def _check_pairs(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> None:
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ValueError(f"tensor {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")


@torch.no_grad()
def ema_update_(teacher_params: Sequence[Tensor], student_params: Sequence[Tensor], momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, in place, with fused foreach kernels."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    _check_pairs(teacher_params, student_params)
    if not teacher_params:
        return
    teacher = [t.detach() for t in teacher_params]
    student = [s.detach().to(t.dtype) for t, s in zip(teacher, student_params)]
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


@torch.no_grad()
def copy_student_to_teacher_(teacher_params: Sequence[Tensor], student_params: Sequence[Tensor]) -> None:
    """Make the teacher an exact copy of the student (the DINOv2 initialisation)."""
    _check_pairs(teacher_params, student_params)
    for t, s in zip(teacher_params, student_params):
        t.detach().copy_(s.detach())


def matching_parameters(teacher: nn.Module, student: nn.Module) -> Tuple[List[Tensor], List[Tensor]]:
    """Teacher and student parameters paired by name (both modules must have the same structure)."""
    t_named = dict(teacher.named_parameters())
    s_named = dict(student.named_parameters())
    if t_named.keys() != s_named.keys():
        only_t = sorted(t_named.keys() - s_named.keys())[:5]
        only_s = sorted(s_named.keys() - t_named.keys())[:5]
        raise ValueError(f"teacher/student parameter names differ: teacher-only {only_t}, student-only {only_s}")
    names = list(s_named)
    return [t_named[n] for n in names], [s_named[n] for n in names]
