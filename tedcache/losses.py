"""Stage-II loss terms, shared by the offline (cached targets) and online (live teacher) paths.

Each term is a small function whose docstring states its formula and the tensor shapes (in the
style of torchtune's kd_losses). The sparse forms (`kd_targets`, `sparse_cross_entropy`,
`sparse_kd_loss`) take the per-token rows that `tedcache.cache.logits.sparsify` stores for language models;
`hidden_kd_loss` rebuilds the full distribution from a --logits hidden cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache.logits import head_logits
from .data import IGNORED
from .loop import COUNT_KINDS
from .tasks import TASK


def labelled(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Which examples (token classification: positions) have a gold label (unlabelled transfer examples
    carry -1, or NaN for regression; positions that are not a word's first sub-token carry IGNORED;
    question answering: (B, 2), per answer start and end)."""
    return ~torch.isnan(labels) if task == "regression" else labels >= 0


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """The task's own loss, a scalar, over the examples that have a gold label (0 when none has).

    classification: mean_b -log softmax(logits_b)[labels_b];  logits (B, C), labels (B,) class ids.
    regression:     mean_b (logits_b - labels_b)^2;            logits (B, 1), labels (B,) floats.
    token classification: the classification loss over tagged positions; logits (B, L, C), labels (B, L).
    question answering: the mean of the start and the end position's cross-entropy over the window's
    tokens (as HF's QA heads); logits (B, L, 2), labels (B, 2) token positions."""
    known = labelled(labels, task)
    if not bool(known.any()):
        return logits.float().sum() * 0.0  # keeps the graph: every process runs the same backward
    if task == "question-answering":
        known = known.all(-1)
        return sum(F.cross_entropy(logits[known][..., k].float(), labels[known][:, k]) for k in (0, 1)) / 2
    if task == "regression":
        return F.mse_loss(logits.squeeze(-1).float()[known], labels.float()[known])
    return F.cross_entropy(logits.float()[known], labels[known])


def labels_or_teacher(labels: torch.Tensor, teacher_logits: torch.Tensor, task: str) -> torch.Tensor:
    """Gold labels where there are some, else the teacher's prediction (Stage I's heads learn the task
    from unlabelled examples through it)."""
    guess = teacher_logits.squeeze(-1).float() if task == "regression" else \
        teacher_logits.argmax(1) if task == "question-answering" else teacher_logits.argmax(-1)
    filled = torch.where(labelled(labels, task), labels, guess.to(labels.dtype))
    return filled.masked_fill(labels == IGNORED, IGNORED) if task == "token-classification" else filled


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, a scalar: position t predicts token t+1,

    mean over pairs (b, t) with mask[b, t+1] = 1 of -log softmax(logits[b, t])[input_ids[b, t+1]].
    logits (B, L, V); input_ids, mask (B, L), mask 1 on real tokens, 0 on padding."""
    targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def lm_loss_per_block(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each block's own mean next-token loss (lm_loss of that row alone), (B,) on the logits' device.
    logits (B, L, V). (Row by row: one (L, V) copy at a time stays in cache, and nothing waits for the device.)"""
    return torch.stack([lm_loss(row[None], ids[None], m[None]) for row, ids, m in zip(logits, input_ids, mask)])


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft-target KD, a scalar: T^2 * mean_b KL(p_T || p_S), p = softmax(z / T) over the last dim.

    student_logits, teacher_logits (B, C). Identically 0 with one output (C = 1)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return t * t * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def span_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Question answering: the mean of kd_loss over the start and over the end distribution, each a softmax
    over the window's real tokens (padding left out). logits (B, L, 2), mask (B, L)."""
    padding = ~mask.bool().unsqueeze(-1)
    student, teacher = (x.float().masked_fill(padding, -1e4) for x in (student_logits, teacher_logits))
    return sum(kd_loss(student[..., k], teacher[..., k], temperature) for k in (0, 1)) / 2


def filtered_mse(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                 mask: torch.Tensor) -> torch.Tensor:
    """Per layer l (shape (layers,)), the element-mean squared error over real tokens:

    sum_{b,t,j} mask[b, t] * (S_l[b, t, j] - T_l[b, t, j])^2 / (d * sum_{b,t} mask[b, t]).
    states: (B, L, d) each; mask: (B, L), 1 on real tokens ([CLS]/[SEP] included), 0 on padding."""
    weight = mask.unsqueeze(-1).float()
    count = weight.sum() * student_states[0].shape[-1]
    per_layer = [(((s.float() - t.float()) ** 2) * weight).sum() / count
                 for s, t in zip(student_states, teacher_states)]
    return torch.stack(per_layer)


def kd_targets(rows: dict, form: str, temperature: float) -> torch.Tensor:
    """Target probabilities q over the stored ids, (..., S); unused slots (id -1) get 0.

    "sampled": q_s = counts_s / sum counts (unbiased for softmax(z / T_s); needs T = T_s).
    "logits":  q_s = softmax(logprobs / T)_s renormalised over the stored ids (the usual top-k KD).
    rows: {"ids" (..., S), "logprobs" (..., S), ["counts" (..., S)]} as `tedcache.cache.logits.sparsify` makes them."""
    valid = rows["ids"] >= 0
    if form == "sampled":
        weights = rows["counts"].float() * valid
        return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    scores = (rows["logprobs"].float() / temperature).masked_fill(~valid, float("-inf"))
    return F.softmax(scores, dim=-1)


def sparse_cross_entropy(student_logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """Per position -sum_s targets_s * log softmax(z / T)[ids_s]. student_logits (..., V); ids, targets (..., S)."""
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(targets * log_probs.gather(-1, ids.clamp_min(0))).sum(-1)


def sparse_kd_loss(student_logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor, temperature: float,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(targets || softmax(z_S / T)) over the stored ids, mean over (unmasked) positions. The
    targets' own entropy does not depend on the student: with sampled targets the gradient is the full
    KD gradient in expectation.

    = T^2 * mean_pos [sparse_cross_entropy + sum_s q_s log q_s], a scalar.
    student_logits (..., V); ids, targets (..., S); mask (...), 1 on positions that count."""
    per_position = sparse_cross_entropy(student_logits, ids, targets, temperature) \
        + torch.special.xlogy(targets, targets).sum(-1)
    if mask is not None:
        per_position = per_position[mask.bool()]
    return temperature ** 2 * per_position.mean()


HEAD_CHUNK = 1024  # positions whose teacher logits are rebuilt at once: at most HEAD_CHUNK x V floats extra


def hidden_kd_loss(student_logits: torch.Tensor, teacher_hidden: torch.Tensor, head: dict[str, torch.Tensor],
                   temperature: float, mask: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KD from the teacher's final hidden states: T^2 * mean over real positions of
    KL(softmax(z_T / T) || softmax(z_S / T)), z_T = head(h) rebuilt in fp32 (autocast off), HEAD_CHUNK
    positions at a time so the teacher's side stays bounded whatever the batch.

    student_logits (B, L, V); teacher_hidden (B, L, d); head {"weight" (V, d)[, "bias" (V,)]}; mask (B, L)."""
    real = mask.bool()
    student, hidden = student_logits[real], teacher_hidden[real]
    total = student.new_zeros((), dtype=torch.float32)
    with torch.autocast(student.device.type, enabled=False):
        for start in range(0, len(hidden), HEAD_CHUNK):
            with torch.no_grad():
                log_q = F.log_softmax(head_logits(hidden[start:start + HEAD_CHUNK], head) / temperature, dim=-1)
            log_p = F.log_softmax(student[start:start + HEAD_CHUNK].float() / temperature, dim=-1)
            total = total + F.kl_div(log_p, log_q, reduction="sum", log_target=True)
    return temperature ** 2 * total / max(1, len(hidden))


class _HeadLosses(torch.autograd.Function):
    """Next-token cross-entropy and exact KD from final hidden states through the output layers, HEAD_CHUNK
    positions at a time; the backward recomputes each chunk's logits rather than keeping them, so no
    (positions x vocabulary) tensor is ever whole. See head_losses."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, kd_rows, teacher_hidden, teacher_weight, teacher_bias,
                temperature: float, vocab: int):
        ce_sum, kl_sum = hidden.new_zeros((), dtype=torch.float32), hidden.new_zeros((), dtype=torch.float32)
        for _rows, z, z_t, t, kd in _head_chunks(hidden, weight, bias, targets, kd_rows, teacher_hidden,
                                                  teacher_weight, teacher_bias):
            ce_sum += F.cross_entropy(z, t, ignore_index=-100, reduction="sum")
            if z_t is not None:
                kl_sum += F.kl_div(F.log_softmax(z[kd, :vocab] / temperature, dim=-1),
                                   F.log_softmax(z_t / temperature, dim=-1), reduction="sum", log_target=True)
        counts = (max(1, int((targets != -100).sum())), max(1, int(kd_rows.sum())))
        ctx.save_for_backward(hidden, weight, bias, targets, kd_rows, teacher_hidden, teacher_weight, teacher_bias)
        ctx.temperature, ctx.vocab, ctx.counts = temperature, vocab, counts
        return ce_sum / counts[0], temperature ** 2 * kl_sum / counts[1]

    @staticmethod
    def backward(ctx, grad_ce, grad_kd):
        hidden, weight, bias, targets, kd_rows, teacher_hidden, teacher_weight, teacher_bias = ctx.saved_tensors
        t, vocab, (n_ce, n_kd) = ctx.temperature, ctx.vocab, ctx.counts
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        for rows, z, z_t, target, kd in _head_chunks(hidden, weight, bias, targets, kd_rows, teacher_hidden,
                                                       teacher_weight, teacher_bias):
            dz = F.softmax(z, dim=-1)  # d CE / dz = softmax - one-hot, on the rows with a target
            scored = target != -100
            dz[scored, target[scored]] -= 1
            dz = dz * (scored[:, None] * (grad_ce / n_ce))
            if z_t is not None:  # d (T^2 KL(q || softmax(z / T))) / dz = T (softmax(z / T) - q)
                p, q = F.softmax(z[kd, :vocab] / t, dim=-1), F.softmax(z_t / t, dim=-1)
                dz[kd, :vocab] += (grad_kd * t / n_kd) * (p - q)
            grad_hidden[rows] = dz @ weight.float()
            grad_weight += dz.T @ hidden[rows].float()
            grad_bias += dz.sum(0)
        return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
                None if bias is None else grad_bias.to(bias.dtype), None, None, None, None, None, None, None)


def _head_chunks(hidden, weight, bias, targets, kd_rows, teacher_hidden, teacher_weight, teacher_bias):
    """Per HEAD_CHUNK positions: (their slice, student logits (fp32), teacher logits of the KD rows or None,
    targets, KD rows)."""
    for start in range(0, len(hidden), HEAD_CHUNK):
        rows = slice(start, start + HEAD_CHUNK)
        z = F.linear(hidden[rows].float(), weight.float(), None if bias is None else bias.float())
        kd = kd_rows[rows]
        z_t = None
        if teacher_hidden is not None and bool(kd.any()):
            z_t = F.linear(teacher_hidden[rows][kd].float(), teacher_weight.float(),
                           None if teacher_bias is None else teacher_bias.float())
        yield rows, z, z_t, targets[rows], kd


def head_losses(final: torch.Tensor, head: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor,
                teacher_hidden: torch.Tensor | None, teacher_head: dict[str, torch.Tensor] | None,
                temperature: float, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lm_loss, hidden_kd_loss) of a causal LM from its final hidden states (B, L, d) and output layer
    `head`, equal to those of its logits up to float rounding, without the (B, L, V) logits: both are
    computed HEAD_CHUNK positions at a time, in fp32 (autocast off), and the backward recomputes each chunk.
    Without `teacher_hidden`, the KD term is 0."""
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    with torch.autocast(final.device.type, enabled=False):
        return _HeadLosses.apply(final.flatten(0, 1), head.weight, head.bias, targets.flatten(),
                                 mask.bool().flatten() if teacher_hidden is not None else torch.zeros_like(
                                     mask, dtype=torch.bool).flatten(),
                                 None if teacher_hidden is None else teacher_hidden.flatten(0, 1),
                                 (teacher_head or {}).get("weight"), (teacher_head or {}).get("bias"),
                                 temperature, vocab)


METHOD_TERMS = {"ted": ("kl", "mse"), "lwd": ("kl", "mse"), "kd": ("kl",), "finetune": ()}  # terms beside the task's


def method_weights(method: str, kl_alpha: float, mse_alpha: float) -> tuple[float, float]:
    """(kl_alpha, mse_alpha) as `method` uses them: the baselines switch terms off (KD: no state term;
    fine-tuning: neither)."""
    terms = METHOD_TERMS[method]
    return (kl_alpha if "kl" in terms else 0.0), (mse_alpha if "mse" in terms else 0.0)


class Stage2Loss(torch.nn.Module):
    """Stage II's objective, the piece a training loop of one's own imports:

        L = task + kl_alpha * KD + mse_alpha * mean over mapped layers l of MSE(filter_l(h_l), t_l) [/ var_l]

    KD is kd_loss (classification, regression), the per-word or per-span forms (token classification,
    question answering), or for causal LMs sparse_kd_loss over stored rows or hidden_kd_loss over the
    exact distribution rebuilt from cached final states. The MSE is filtered_mse against the teacher's
    filtered states (ted) or raw states (lwd, the filters then project the student's width to the
    teacher's); `filters` are the student's own (trainable: give their parameters to the optimiser).

    Built from what it uses: `method` (ted, lwd, kd, finetune: see method_weights), the two weights, the
    KD temperature, the student's `filters` (their spec's layers are the student layers the map pairs
    with the batch's teacher_states, in order), `state_variance` (one per mapped layer: --mse-norm
    variance) and, for causal LMs, the form of the KD targets (see kd_targets; "hidden" with the
    teacher's output layer `head`) and the `vocab` the teacher's rows span. With `from_head`, a causal LM
    whose KD targets are the exact distribution (or that has no KD term) takes its task and KD terms from
    its final hidden states through its output layer, chunk by chunk (head_losses), never from whole logits.

    forward(student_logits, student_states, batch, head=None) -> (loss, terms): the student's logits (B, C),
    (B, L, C) or causal-lm (B, L, V) — or, when `from_head`, head=(its final hidden states (B, L, d), its
    output layer) instead — its hidden states at `layers` (B, L, d) each, and a batch holding the
    targets as tedcache's reader (or online mode) fills them: labels, teacher_logits, teacher_rows,
    teacher_hidden, teacher_states (CompactStates), attention_mask, and optionally "share" (see
    loop.batch_shares). `terms` keeps each term with its graph (task, kl, mse, mse/<layer>)."""

    def __init__(self, task: str, method: str = "ted", kl_alpha: float = 1.0, mse_alpha: float = 1.0,
                 temperature: float = 2.0, filters: torch.nn.Module | None = None,
                 state_variance: torch.Tensor | None = None, kd_form: str = "logits", vocab: int | None = None,
                 head: dict[str, torch.Tensor] | None = None, from_head: bool = False):
        super().__init__()
        self.task, self.method, self.temperature, self.kd_form, self.vocab = task, method, temperature, kd_form, vocab
        self.kl_alpha, self.mse_alpha = method_weights(method, kl_alpha, mse_alpha)
        self.from_head = from_head and TASK[task].causal and (kd_form == "hidden" or self.kl_alpha == 0)
        self.filters = filters
        self.register_buffer("state_variance", state_variance, persistent=False)
        for name in ("weight", "bias"):
            self.register_buffer(f"head_{name}", (head or {}).get(name), persistent=False)

    @property
    def layers(self) -> list[int]:
        """The student layers whose hidden states forward takes."""
        return self.filters.spec.layers if self.filters is not None else []

    def needs(self) -> list[str]:
        """The batch keys forward reads."""
        lm = TASK[self.task].causal
        keys = ["input_ids", "attention_mask"] if lm else ["labels", "attention_mask"]
        if self.kl_alpha > 0:
            keys.append(("teacher_hidden" if self.kd_form == "hidden" else "teacher_rows") if lm else "teacher_logits")
        if self.filters is not None and self.mse_alpha > 0:
            keys.append("teacher_states")
        return keys

    def forward(self, student_logits: torch.Tensor | None, student_states: list[torch.Tensor], batch: dict,
                head: tuple[torch.Tensor, torch.nn.Module] | None = None):
        mask = batch["attention_mask"]
        lm = TASK[self.task].causal
        share = batch.get("share") or {}  # 1 for a single process without accumulation
        per_example, per_token, per_pair = (share.get(k, 1.0) for k in COUNT_KINDS)
        if head is not None:
            teacher = batch["teacher_hidden"].widen() if self.kl_alpha > 0 else None
            task, kd = head_losses(*head, batch["input_ids"], mask, teacher, self._teacher_head(), self.temperature,
                                   self.vocab or head[1].weight.shape[0])
        else:
            task = lm_loss(student_logits, batch["input_ids"], mask) if lm else task_loss(student_logits,
                                                                                             batch["labels"], self.task)
        terms = {"task": task * (per_pair if lm else per_example)}
        loss = terms["task"]
        if self.kl_alpha > 0:
            terms["kl"] = (kd if head is not None else self._kd(student_logits, batch, mask)) * (per_token if lm
                                                                                                else per_example)
            loss = loss + self.kl_alpha * terms["kl"]
        if self.filters is not None and self.mse_alpha > 0:
            targets = [s.widen() for s in batch["teacher_states"]]  # compact on the wire, fp32 only here
            per_layer = filtered_mse(self.filters(student_states), targets, mask) * per_token
            if self.state_variance is not None:
                per_layer = per_layer / self.state_variance
            terms["mse"] = per_layer.mean()
            terms.update({f"mse/{layer}": value for layer, value in zip(self.layers, per_layer)})
            loss = loss + self.mse_alpha * terms["mse"]
        return loss, terms

    def _teacher_head(self) -> dict[str, torch.Tensor]:
        return {"weight": self.head_weight, **({"bias": self.head_bias} if self.head_bias is not None else {})}

    def _kd(self, logits: torch.Tensor, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        if TASK[self.task].causal and self.kd_form == "hidden":
            return hidden_kd_loss(logits[..., :self.vocab], batch["teacher_hidden"].widen(), self._teacher_head(), t,
                                  mask)
        if TASK[self.task].causal:
            rows = batch["teacher_rows"]
            return sparse_kd_loss(logits[..., :self.vocab], rows["ids"].long(), kd_targets(rows, self.kd_form, t), t,
                                  mask)
        if self.task == "token-classification":  # per word (its first sub-token), tagged or not
            words = batch["labels"] != IGNORED
            return kd_loss(logits[words], batch["teacher_logits"][words], t)
        if self.task == "question-answering":  # over the window's tokens, start and end averaged
            return span_kd_loss(logits, batch["teacher_logits"], mask, t)
        return kd_loss(logits, batch["teacher_logits"], t)
