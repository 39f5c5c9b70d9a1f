"""Stage-II loss terms, shared by the offline (cached targets) and online (live teacher) paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy on class ids, or MSE on a single regression output. logits: (B, C)."""
    if task == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1, mean over real (unmasked) pairs. logits (B, L, V)."""
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_T/T) || softmax(z_S/T)), batch mean. Identically 0 with one output."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return t * t * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def filtered_mse(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                 mask: torch.Tensor) -> torch.Tensor:
    """Per layer (one value each, shape (layers,)), the element-mean squared error over real tokens.

    states: (B, L, d) each; mask: (B, L), 1 on real tokens ([CLS]/[SEP] included), 0 on padding."""
    weight = mask.unsqueeze(-1).float()
    count = weight.sum() * student_states[0].shape[-1]
    per_layer = [(((s.float() - t.float()) ** 2) * weight).sum() / count
                 for s, t in zip(student_states, teacher_states)]
    return torch.stack(per_layer)
