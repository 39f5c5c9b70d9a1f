import numpy as np
import torch
import torch.nn.functional as F

from tedcache.cache.logits import LogitSpec, id_dtype, sparsify
from tedcache.losses import kd_targets, sparse_cross_entropy, sparse_kd_loss


def test_id_dtype_is_the_smallest_that_fits():
    assert id_dtype(100) == np.int8 and id_dtype(30522) == np.int16 and id_dtype(49152) == np.int32


def test_sampled_targets_are_unbiased():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    generator = torch.Generator().manual_seed(1)
    full = F.softmax(logits, dim=-1)
    student = torch.randn(4, 50)
    full_ce = -(full * F.log_softmax(student, -1)).sum(-1)
    spec = LogitSpec("sample", 50, 1.0)
    total, ce = torch.zeros_like(full), torch.zeros(4)
    rounds = 2000
    for _ in range(rounds):
        rows = sparsify(logits, spec, generator)
        assert (rows["counts"].sum(-1) == 50).all()
        targets = kd_targets(rows, "sampled", 1.0)
        total.scatter_add_(1, rows["ids"].clamp_min(0), targets)
        ce += sparse_cross_entropy(student, rows["ids"], targets, 1.0)
    assert (total / rounds - full).abs().max() < 0.01  # the mean of the sparse targets approaches p
    assert (ce / rounds - full_ce).abs().max() < 0.02  # and so does the student's cross-entropy against them


def test_top_k_is_biased_where_sampling_is_not():
    torch.manual_seed(0)
    logits = 0.3 * torch.randn(2, 1000)  # a flat distribution: the top 25 hold little of the mass
    rows = sparsify(logits, LogitSpec("topk", 25, 1.0))
    values = logits.gather(-1, rows["ids"])
    assert (values[:, :-1] >= values[:, 1:]).all()
    kept = rows["logprobs"].float().exp().sum(-1)
    assert (kept < 0.2).all()  # renormalising over these ids inflates each kept probability > 5x


def test_logit_targets_at_any_temperature_and_the_kl_is_zero_at_the_target():
    logits = torch.randn(3, 12)
    rows = sparsify(logits, LogitSpec("full", 12, 1.0))
    for t in (1.0, 2.0):
        targets = kd_targets(rows, "logits", t)
        assert torch.allclose(targets, F.softmax(logits / t, -1), atol=2e-3)  # fp16 log-probabilities
        assert float(sparse_kd_loss(logits, rows["ids"], F.softmax(logits / t, -1), t)) < 1e-5
        assert float(sparse_kd_loss(torch.zeros(3, 12), rows["ids"], targets, t)) > 0.01
