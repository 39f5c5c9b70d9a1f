"""Each Stage-II loss term against an independent reference: plain Python loops with math.exp/math.log
over the elements of small hand-made tensors (no torch.nn.functional in the references)."""

import math

import pytest
import torch

from tedcache.cache import CompactStates
from tedcache.filters import FilterBank, FilterSpec
from tedcache.losses import (
    Stage2Loss,
    filtered_mse,
    kd_loss,
    kd_targets,
    lm_loss,
    sparse_cross_entropy,
    sparse_kd_loss,
    task_loss,
)

REL, ABS = 1e-5, 1e-6  # the implementation works in float32, the references in Python floats (double)


def log_softmax(row, temperature=1.0):
    """log softmax(row / T) of a list of floats."""
    scaled = [x / temperature for x in row]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(x - top) for x in scaled))
    return [x - log_norm for x in scaled]


def softmax(row, temperature=1.0):
    return [math.exp(v) for v in log_softmax(row, temperature)]


def kl(p, q):
    """KL(p || q) = sum_i p_i log(p_i / q_i), with 0 log 0 = 0."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


# ---------------------------------------------------------------- task_loss


def test_task_loss_classification_is_the_mean_negative_log_likelihood():
    logits = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.7, 1.9, 0.4]]
    labels = [0, 2, 1]
    expected = sum(-log_softmax(row)[y] for row, y in zip(logits, labels)) / len(labels)
    got = task_loss(torch.tensor(logits), torch.tensor(labels), "classification")
    assert got.dim() == 0 and float(got) == pytest.approx(expected, rel=REL, abs=ABS)


def test_task_loss_regression_is_the_mean_squared_error():
    outputs = [[0.5], [2.0], [-1.0], [3.25]]  # (B, 1): the single output is squeezed
    labels = [1.0, 2.0, 0.5, 3.0]
    expected = sum((o[0] - y) ** 2 for o, y in zip(outputs, labels)) / len(labels)  # (0.25 + 0 + 2.25 + 0.0625) / 4
    assert expected == pytest.approx(0.640625)
    got = task_loss(torch.tensor(outputs), torch.tensor(labels), "regression")
    assert float(got) == pytest.approx(expected, rel=REL, abs=ABS)


# ---------------------------------------------------------------- lm_loss

LM_LOGITS = [  # (B=2, L=4, V=5)
    [[1.0, 0.2, -0.5, 0.3, 0.0], [0.1, 2.0, 0.4, -1.0, 0.5], [0.3, 0.3, 1.5, 0.2, -0.2], [0.9, -0.4, 0.0, 0.6, 1.1]],
    [[-0.3, 0.8, 0.1, 1.2, 0.0], [2.2, 0.1, -0.6, 0.3, 0.4], [0.0, 0.0, 0.0, 3.0, -1.0], [0.5, 0.5, 0.5, 0.5, 0.5]],
]
LM_IDS = [[0, 1, 2, 4], [3, 0, 4, 4]]
LM_MASK = [[1, 1, 1, 1], [1, 1, 0, 0]]  # the second sequence has two padding tokens at the end


def lm_reference(logits, ids, mask):
    """Position t predicts token t + 1; only pairs whose target token t + 1 is real count."""
    losses = []
    for b in range(len(ids)):
        for t in range(len(ids[b]) - 1):
            if mask[b][t + 1]:
                losses.append(-log_softmax(logits[b][t])[ids[b][t + 1]])
    return sum(losses) / len(losses)


def test_lm_loss_is_the_next_token_cross_entropy_over_real_tokens():
    expected = lm_reference(LM_LOGITS, LM_IDS, LM_MASK)  # 3 + 1 = 4 pairs
    got = lm_loss(torch.tensor(LM_LOGITS), torch.tensor(LM_IDS), torch.tensor(LM_MASK))
    assert got.dim() == 0 and float(got) == pytest.approx(expected, rel=REL, abs=ABS)


def test_lm_loss_padding_is_ignored_and_would_change_the_value():
    masked = float(lm_loss(torch.tensor(LM_LOGITS), torch.tensor(LM_IDS), torch.tensor(LM_MASK)))
    # negative control: with every token counted (6 pairs) the value is different...
    unmasked = lm_reference(LM_LOGITS, LM_IDS, [[1] * 4, [1] * 4])
    assert abs(unmasked - masked) > 0.05
    assert float(lm_loss(torch.tensor(LM_LOGITS), torch.tensor(LM_IDS), torch.ones(2, 4))) \
        == pytest.approx(unmasked, rel=REL, abs=ABS)
    # ...while changing the padding's token ids and the logits that predict them does not change it
    ids, logits = torch.tensor(LM_IDS), torch.tensor(LM_LOGITS)
    ids[1, 2:] = torch.tensor([1, 2])
    logits[1, 1:] = 7 * torch.randn(3, 5)
    assert float(lm_loss(logits, ids, torch.tensor(LM_MASK))) == pytest.approx(masked, rel=REL, abs=ABS)


# ---------------------------------------------------------------- kd_loss

KD_STUDENT = [[1.0, -0.5, 0.3, 2.0], [0.0, 0.4, -1.2, 0.8], [1.5, 1.5, -0.3, 0.1]]
KD_TEACHER = [[2.5, -1.0, 0.0, 1.0], [-0.6, 1.3, -0.2, 0.9], [0.2, 2.4, -1.5, 0.3]]


def kd_reference(student, teacher, t):
    """T^2 * mean over rows of KL(softmax(z_T / T) || softmax(z_S / T))."""
    return t * t * sum(kl(softmax(zt, t), softmax(zs, t)) for zs, zt in zip(student, teacher)) / len(student)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_is_t_squared_times_the_batch_mean_kl(temperature):
    expected = kd_reference(KD_STUDENT, KD_TEACHER, temperature)
    got = kd_loss(torch.tensor(KD_STUDENT), torch.tensor(KD_TEACHER), temperature)
    assert got.dim() == 0 and float(got) == pytest.approx(expected, rel=REL, abs=ABS)


def test_kd_loss_temperature_matters():
    at_1 = float(kd_loss(torch.tensor(KD_STUDENT), torch.tensor(KD_TEACHER), 1.0))
    at_2 = float(kd_loss(torch.tensor(KD_STUDENT), torch.tensor(KD_TEACHER), 2.0))
    # T both softens the two distributions and scales by T^2: neither the same value nor a plain T^2 multiple
    assert abs(at_2 - at_1) > 0.02 and abs(at_2 - 4 * at_1) > 0.5  # 0.415 vs 0.374 (and 4 * 0.374)
    assert at_1 == pytest.approx(kd_reference(KD_STUDENT, KD_TEACHER, 1.0), rel=REL, abs=ABS)
    assert at_2 == pytest.approx(kd_reference(KD_STUDENT, KD_TEACHER, 2.0), rel=REL, abs=ABS)


def test_kd_loss_is_zero_at_the_teacher_and_with_one_output():
    assert float(kd_loss(torch.tensor(KD_TEACHER), torch.tensor(KD_TEACHER), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(torch.tensor([[0.3], [5.0]]), torch.tensor([[-2.0], [1.0]]), 2.0)) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- filtered_mse


def mse_reference(student_layer, teacher_layer, mask):
    """sum over real tokens and features of the squared error / (real tokens * d)."""
    total, count = 0.0, 0
    for b, row in enumerate(mask):
        for t, real in enumerate(row):
            if real:
                for s, v in zip(student_layer[b][t], teacher_layer[b][t]):
                    total += (s - v) ** 2
                count += len(student_layer[b][t])
    return total / count


def test_filtered_mse_one_value_a_layer_over_real_tokens():
    torch.manual_seed(0)
    students = [torch.randn(2, 3, 2) for _ in range(3)]  # 3 layers of (B=2, L=3, d=2)
    teachers = [torch.randn(2, 3, 2) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # 5 real tokens, 10 elements a layer
    got = filtered_mse(students, teachers, mask)
    assert got.shape == (3,)
    expected = [mse_reference(s.tolist(), t.tolist(), mask.tolist()) for s, t in zip(students, teachers)]
    for g, e in zip(got.tolist(), expected):
        assert g == pytest.approx(e, rel=REL, abs=ABS)


def test_filtered_mse_padding_is_ignored_and_would_change_the_value():
    student = [[[1.0, 2.0], [0.0, 0.0], [5.0, -5.0]]]  # (1, 3, 2); the last token is padding
    teacher = [[[0.0, 2.0], [1.0, 1.0], [0.0, 0.0]]]
    mask = torch.tensor([[1, 1, 0]])
    # real tokens: (1-0)^2 + 0 + (0-1)^2 + (0-1)^2 = 3 over 2 tokens * 2 features = 0.75
    got = filtered_mse([torch.tensor(student)] * 2, [torch.tensor(teacher)] * 2, mask)
    torch.testing.assert_close(got, torch.tensor([0.75, 0.75]))
    # negative control: counting the padding adds 25 + 25 over 6 elements = (3 + 50) / 6
    got_all = filtered_mse([torch.tensor(student)], [torch.tensor(teacher)], torch.ones(1, 3))
    assert float(got_all[0]) == pytest.approx(53 / 6)


# ---------------------------------------------------------------- kd_targets


def test_kd_targets_sampled_are_counts_over_draws_and_unused_slots_get_zero():
    rows = {"ids": torch.tensor([[[3, 1, -1, -1], [0, 2, 4, -1]]]),  # (1, 2, S=4)
            "counts": torch.tensor([[[3, 1, 0, 0], [2, 1, 1, 7]]], dtype=torch.uint8),  # a stray count at id -1
            "logprobs": torch.zeros(1, 2, 4, dtype=torch.float16)}
    expected = []
    for ids, counts in zip(rows["ids"][0].tolist(), rows["counts"][0].tolist()):
        used = sum(c for i, c in zip(ids, counts) if i >= 0)
        expected.append([c / used if i >= 0 else 0.0 for i, c in zip(ids, counts)])
    assert expected == [[0.75, 0.25, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]]
    got = kd_targets(rows, "sampled", 1.0)
    assert got.shape == (1, 2, 4)
    torch.testing.assert_close(got[0], torch.tensor(expected))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_targets_logits_are_renormalised_softmax_over_the_stored_ids(temperature):
    logprobs = [[-0.5, -1.25, -2.0, 0.0], [-0.25, -3.0, 0.0, 0.0]]  # fp16-exact; slots at id -1 hold 0
    ids = [[7, 2, 5, -1], [1, 0, -1, -1]]
    rows = {"ids": torch.tensor(ids), "logprobs": torch.tensor(logprobs, dtype=torch.float16)}
    expected = []
    for row_ids, row_lp in zip(ids, logprobs):
        weights = [math.exp(lp / temperature) if i >= 0 else 0.0 for i, lp in zip(row_ids, row_lp)]
        expected.append([w / sum(weights) for w in weights])
    got = kd_targets(rows, "logits", temperature)
    torch.testing.assert_close(got, torch.tensor(expected))
    assert (got[:, -1] == 0).all()


def test_kd_targets_logits_temperature_flattens():
    rows = {"ids": torch.tensor([[0, 1]]), "logprobs": torch.tensor([[-0.5, -2.5]], dtype=torch.float16)}
    # T = 1: exp(-0.5), exp(-2.5) renormalised = 1 / (1 + e^-2); T = 2: 1 / (1 + e^-1)
    assert float(kd_targets(rows, "logits", 1.0)[0, 0]) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert float(kd_targets(rows, "logits", 2.0)[0, 0]) == pytest.approx(1 / (1 + math.exp(-1.0)))


# ---------------------------------------------------------------- sparse_cross_entropy / sparse_kd_loss

SPARSE_STUDENT = [  # (B=2, L=3, V=5)
    [[0.5, -1.0, 2.0, 0.3, 0.0], [1.2, 0.4, -0.3, -2.0, 0.9], [0.0, 0.1, 0.2, 0.3, 0.4]],
    [[-0.8, 1.6, 0.2, 0.7, -0.1], [3.0, -1.0, 0.5, 0.5, 0.0], [0.6, -0.6, 1.1, -0.2, 2.2]],
]
SPARSE_IDS = [
    [[2, 0, -1], [4, 1, 3], [0, -1, -1]],
    [[1, 3, 2], [0, 2, -1], [4, 2, 1]],
]
SPARSE_TARGETS = [  # rows sum to 1; 0 at id -1
    [[0.6, 0.4, 0.0], [0.5, 0.3, 0.2], [1.0, 0.0, 0.0]],
    [[0.7, 0.2, 0.1], [0.25, 0.75, 0.0], [0.4, 0.4, 0.2]],
]


def sparse_ce_reference(student_row, ids, targets, t):
    log_p = log_softmax(student_row, t)
    return -sum(q * log_p[i] for i, q in zip(ids, targets) if i >= 0)


def sparse_kl_reference(student_row, ids, targets, t):
    """KL(q || p_S) over the stored ids: sum_s q_s (log q_s - log p_S[id_s])."""
    log_p = log_softmax(student_row, t)
    return sum(q * (math.log(q) - log_p[i]) for i, q in zip(ids, targets) if i >= 0 and q > 0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_cross_entropy_per_position(temperature):
    got = sparse_cross_entropy(torch.tensor(SPARSE_STUDENT), torch.tensor(SPARSE_IDS), torch.tensor(SPARSE_TARGETS),
                               temperature)
    assert got.shape == (2, 3)
    for b in range(2):
        for t in range(3):
            expected = sparse_ce_reference(SPARSE_STUDENT[b][t], SPARSE_IDS[b][t], SPARSE_TARGETS[b][t], temperature)
            assert float(got[b, t]) == pytest.approx(expected, rel=REL, abs=ABS)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kd_loss_is_t_squared_times_the_mean_kl_over_unmasked_positions(temperature):
    mask = [[1, 1, 0], [1, 0, 1]]
    kls = [sparse_kl_reference(SPARSE_STUDENT[b][t], SPARSE_IDS[b][t], SPARSE_TARGETS[b][t], temperature)
           for b in range(2) for t in range(3) if mask[b][t]]
    expected = temperature ** 2 * sum(kls) / len(kls)
    args = torch.tensor(SPARSE_STUDENT), torch.tensor(SPARSE_IDS), torch.tensor(SPARSE_TARGETS), temperature
    got = sparse_kd_loss(*args, torch.tensor(mask))
    assert got.dim() == 0 and float(got) == pytest.approx(expected, rel=REL, abs=ABS)
    # negative control: the masked positions would change the value if they counted
    every = [sparse_kl_reference(SPARSE_STUDENT[b][t], SPARSE_IDS[b][t], SPARSE_TARGETS[b][t], temperature)
             for b in range(2) for t in range(3)]
    unmasked = temperature ** 2 * sum(every) / len(every)
    assert abs(unmasked - expected) > 0.01
    assert float(sparse_kd_loss(*args)) == pytest.approx(unmasked, rel=REL, abs=ABS)


def test_sparse_kd_loss_temperature_matters():
    args = torch.tensor(SPARSE_STUDENT), torch.tensor(SPARSE_IDS), torch.tensor(SPARSE_TARGETS)
    at_1, at_2 = float(sparse_kd_loss(*args, 1.0)), float(sparse_kd_loss(*args, 2.0))
    assert abs(at_2 - at_1) > 0.05 and abs(at_2 - 4 * at_1) > 0.05


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kd_loss_on_full_rows_equals_kd_loss(temperature):
    """With every id stored and q = softmax(z_T / T), the sparse KL is the full KL: T^2 * KL per position."""
    student, teacher = torch.tensor(KD_STUDENT), torch.tensor(KD_TEACHER)  # (3 positions, V=4)
    ids = torch.arange(4).expand(3, -1)
    targets = torch.tensor([softmax(row, temperature) for row in KD_TEACHER])
    for p in range(3):
        sparse = sparse_kd_loss(student[p:p + 1], ids[p:p + 1], targets[p:p + 1], temperature)
        full = kd_loss(student[p:p + 1], teacher[p:p + 1], temperature)
        assert float(sparse) == pytest.approx(float(full), rel=1e-5, abs=1e-6)
        assert float(full) == pytest.approx(temperature ** 2 * kl(softmax(KD_TEACHER[p], temperature),
                                                                  softmax(KD_STUDENT[p], temperature)), rel=REL)
    assert float(sparse_kd_loss(student, ids, targets, temperature)) \
        == pytest.approx(float(kd_loss(student, teacher, temperature)), rel=1e-5, abs=1e-6)
    # the same through the cached form: "full" rows (fp16 log-probabilities at T = 1) and kd_targets "logits"
    rows = {"ids": ids, "logprobs": torch.tensor([log_softmax(row) for row in KD_TEACHER]).half()}
    cached = sparse_kd_loss(student, ids, kd_targets(rows, "logits", temperature), temperature)
    assert float(cached) == pytest.approx(float(kd_loss(student, teacher, temperature)), rel=2e-3, abs=1e-4)


def test_cache_records_each_layers_state_variance_and_the_normalised_mse_uses_it(assets, tmp_path):
    """The variance the writer gathers from its units equals numpy's over the states it was handed, and
    --mse-norm variance divides each layer's MSE by it (the logged terms show both)."""
    import numpy as np

    from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract
    from tedcache.cache import Cache
    from tedcache.config import FilterConfig
    from tedcache.filters import FilterBank
    from tedcache.models import load_classifier
    from tedcache.reader import CacheSource, iterate_batches
    from tedcache.teacher import teacher_targets

    data = DataConfig(train=[str(assets["train"])], eval=[str(assets["eval"])], max_length=24)
    path = extract(ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "c"),
                                 precision="fp32", shard_tokens=256, filters=FilterConfig(layers="1,3"),
                                 stage1=OptimConfig(epochs=1, batch_size=16)))
    cache = Cache(path)
    teacher = load_classifier(str(assets["teacher"])).eval()
    bank = FilterBank.from_bytes(cache.filter_files()).eval()
    states = {1: [], 3: []}
    for batch in iterate_batches(CacheSource(cache.split("train")), 16, 0):
        _, filtered = teacher_targets(teacher, bank, batch, [1, 3])
        for layer, s in zip((1, 3), filtered):
            states[layer].append(s[batch["attention_mask"].bool()].double().numpy())
    for layer in (1, 3):
        expected = np.concatenate(states[layer]).var(axis=0).mean()
        assert cache.metadata.state_variance[str(layer)] == pytest.approx(expected, rel=1e-4)
    runs = {}
    for norm in ("none", "variance"):
        runs[norm] = distill(DistillConfig(cache=path, student=str(assets["student"]), out=str(tmp_path / norm),
                                           method="ted", mse_norm=norm, log_every=1, max_steps=1, layer_map="0:1,1:3",
                                           optim=OptimConfig(epochs=1, batch_size=16)))["history"][0]
    variance = cache.metadata.state_variance
    for j, layer in enumerate((1, 3)):
        assert runs["variance"][f"mse/{j}"] == pytest.approx(runs["none"][f"mse/{j}"] / variance[str(layer)], rel=1e-5)


def test_gradient_ratio_is_logged_every_few_logged_steps(assets, tmp_path):
    from tedcache import DataConfig, DistillConfig, ExtractConfig, OptimConfig, distill, extract
    from tedcache.stage2 import PROBE_EVERY

    data = DataConfig(train=[str(assets["train"])], max_length=24)
    path = extract(ExtractConfig(teacher=str(assets["teacher"]), data=data, cache_dir=str(tmp_path / "c"),
                                 stage1=OptimConfig(epochs=1, batch_size=16)))
    history = distill(DistillConfig(cache=path, student=str(assets["student"]), out=str(tmp_path / "o"), log_every=1,
                                    method="ted", optim=OptimConfig(epochs=2, batch_size=16)))["history"]
    probed = [h["step"] for h in history if "grad_ratio" in h]
    assert probed == [s for s in range(1, len(history) + 1) if s % PROBE_EVERY == 0] and probed
    assert all(h["grad_ratio"] > 0 for h in history if "grad_ratio" in h)


# ---------------------------------------------------------------- Stage2Loss: the terms together


def test_stage2_loss_is_the_weighted_sum_of_the_references():
    """Stage2Loss alone, on hand-made tensors: task + kl_alpha * KD + mse_alpha * mean over layers of the
    filtered MSE divided by each layer's variance; each method keeps only its terms."""
    torch.manual_seed(0)
    hidden = [torch.randn(3, 2, 4) for _ in range(2)]  # the student's states at layers 0 and 1: (B=3, L=2, d=4)
    teacher = [torch.randn(3, 2, 5) for _ in range(2)]  # the cached teacher states, d_f = 5
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    labels = [3, 0, 1]
    batch = {"attention_mask": mask, "labels": torch.tensor(labels), "teacher_logits": torch.tensor(KD_TEACHER),
             "teacher_states": [CompactStates(t) for t in teacher]}
    filters = FilterBank(FilterSpec([0, 1], 4, 5))
    variance = torch.tensor([2.0, 0.5])
    loss = Stage2Loss("classification", "ted", kl_alpha=3.0, mse_alpha=5.0, temperature=2.0, filters=filters,
                      state_variance=variance)
    total, terms = loss(torch.tensor(KD_STUDENT), hidden, batch)
    task = sum(-log_softmax(row)[y] for row, y in zip(KD_STUDENT, labels)) / 3
    kd = kd_reference(KD_STUDENT, KD_TEACHER, 2.0)
    with torch.no_grad():
        filtered = filters(hidden)
    mse = [mse_reference(f.tolist(), t.tolist(), mask.tolist()) / v for f, t, v in zip(filtered, teacher, variance.tolist())]
    expected = {"task": task, "kl": kd, "mse/0": mse[0], "mse/1": mse[1], "mse": sum(mse) / 2}
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=REL, abs=ABS), key
    assert total.item() == pytest.approx(task + 3.0 * kd + 5.0 * sum(mse) / 2, rel=REL, abs=ABS)
    total.backward()
    assert all(p.grad is not None for p in filters.parameters())  # the filters train with the student
    for method, kept in (("kd", {"task", "kl"}), ("finetune", {"task"}), ("lwd", set(expected))):
        total, terms = Stage2Loss("classification", method, 3.0, 5.0, 2.0, filters, variance)(
            torch.tensor(KD_STUDENT), hidden, batch)
        assert set(terms) == kept, method
        assert total.item() == pytest.approx(task + 3.0 * kd * ("kl" in kept) + 5.0 * sum(mse) / 2 * ("mse" in kept),
                                             rel=REL, abs=ABS), method
