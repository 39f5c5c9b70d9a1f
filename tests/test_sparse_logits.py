import numpy as np
import torch
import torch.nn.functional as F

from tedcache.sparse_logits import id_dtype, sample, sparse_kd_loss, sparse_targets, top_k


def test_id_dtype_is_the_smallest_that_fits():
    assert id_dtype(100) == np.int8 and id_dtype(30522) == np.int16 and id_dtype(49152) == np.int32


def test_sampled_targets_are_unbiased():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    generator = torch.Generator().manual_seed(1)
    full = F.softmax(logits, dim=-1)
    total = torch.zeros_like(full)
    rounds = 2000
    for _ in range(rounds):
        ids, counts = sample(logits, 50, generator=generator)
        assert (counts.sum(-1) == 50).all()
        total.scatter_add_(1, ids.clamp_min(0), sparse_targets(ids, counts))
    estimate = total / rounds
    assert (estimate - full).abs().max() < 0.01  # the mean of the sparse targets approaches p
    # and the loss is unbiased too: mean sparse CE ~ full CE for a fixed student
    student = torch.randn(4, 50)
    full_ce = -(full * F.log_softmax(student, -1)).sum(-1).mean()
    sparse = torch.stack([sparse_kd_loss(student, *(lambda i, c: (i, sparse_targets(i, c)))(
        *sample(logits, 50, generator=generator)), temperature=1.0) for _ in range(rounds)])
    assert abs(float(sparse.mean() - full_ce)) < 0.02


def test_top_k_is_biased_where_sampling_is_not():
    torch.manual_seed(0)
    logits = 0.3 * torch.randn(2, 1000)  # a flat distribution: the top 25 hold little of the mass
    ids, values = top_k(logits, 25)
    assert torch.equal(values, logits.gather(-1, ids)) and (values[:, :-1] >= values[:, 1:]).all()
    kept = F.softmax(logits, -1).gather(-1, ids).sum(-1)
    assert (kept < 0.2).all()
