"""Causal-LM TED on tiny random-initialised GPT-2 and Llama models: packing, per-layer LM heads, sparse
logits in the cache, offline == live losses, distilling with the teacher gone, tokenizer checks."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.builders import make_lm, write_text
from helpers.caches import extract_lm
from helpers.commands import run_cli

from tedcache import DataConfig, DistillConfig, OptimConfig, distill, losses
from tedcache.cache import Cache, inspect_cache, verify
from tedcache.cache.layout import FINAL, HEAD_FILE
from tedcache.cache.logits import check_rebuilt, head_logits, parse_logit_spec, sparsify
from tedcache.data import load_blocks
from tedcache.distributed import pick_device
from tedcache.errors import TedcacheError
from tedcache.evaluate import evaluate
from tedcache.filters import FilterBank, FilterSpec
from tedcache.losses import Stage2Loss, hidden_kd_loss, kd_loss
from tedcache.models import load_causal_lm, load_tokenizer
from tedcache.reader import CacheSource, ExamplesSource, iterate_batches
from tedcache.stage1 import FilterTraining, train_filters
from tedcache.stage2 import kd_form, stage2_step
from tedcache.taps import final_norm, forward_with_taps
from tedcache.teacher import LiveTargets
from tedcache.teacher_pass import unit_generator


def test_packing_joins_documents_with_eos_and_cuts_blocks(lm_assets, tmp_path):
    tokenizer = load_tokenizer(str(lm_assets["llama"]))
    docs = ["good film", "the plot was dull", "fun"]
    path = write_text(tmp_path / "docs.txt", docs)
    examples = load_blocks([str(path)], DataConfig(train=[], task="causal-lm", block_size=3), tokenizer, "--data")
    eos = tokenizer.eos_token_id
    stream = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]  # 10 tokens
    assert len(examples) == 3 and examples.input_ids.tolist() == stream[:9]  # the partial 4th block is dropped
    assert np.diff(examples.offsets).tolist() == [3, 3, 3] and examples.labels is None
    limited = load_blocks([str(path)], DataConfig(train=[], task="causal-lm", block_size=3), tokenizer, "--data", 2)
    assert len(limited) == 2 and limited.fingerprint != examples.fingerprint
    with pytest.raises(TedcacheError, match="fewer than one block"):
        load_blocks([str(path)], DataConfig(train=[], task="causal-lm", block_size=64), tokenizer, "--data")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_taps_read_the_normed_residual_stream(lm_assets, family):
    model = load_causal_lm(str(lm_assets[family])).eval()
    batch = {"input_ids": torch.randint(3, 20, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for layer in (model.transformer.h if family == "gpt2" else model.model.layers)]
    with torch.no_grad():
        _, taps = forward_with_taps(model, batch, [0, 1, 2, 3])
    for hook in hooks:
        hook.remove()
    norm = final_norm(model)
    for tap, residual in zip(taps, captured):
        assert torch.allclose(tap, norm(residual), atol=1e-5)  # every layer, the last one included


@pytest.mark.parametrize("family,head", [("gpt2", "tied"), ("llama", "tied"), ("llama", "new")])
def test_stage1_lm_heads_train_only_filters(lm_assets, family, head):
    model = load_causal_lm(str(lm_assets[family]))
    tokenizer = load_tokenizer(str(lm_assets[family]))
    blocks = load_blocks([str(lm_assets["train"])], DataConfig(train=[], task="causal-lm", block_size=16),
                         tokenizer, "--data")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    bank = FilterBank(FilterSpec([1, 3], 32, 24))
    training = FilterTraining("causal-lm", None, OptimConfig(epochs=4, lr=1e-2, batch_size=8), 0, 42, lm_head=head)
    result = train_filters(model, bank, ExamplesSource(blocks), training, eval_source=ExamplesSource(blocks))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the tied embedding included
    history = result["history"]
    assert set(history[0]) >= {"layer_1", "layer_3"}
    assert history[-1]["loss"] < history[0]["loss"] - 0.3  # the heads learn next-token prediction
    metrics = result["filters"]["metrics"]  # each filter beside what its layer says through the model's own head
    assert all(metrics[f"{layer}/loss"] > 0 and metrics[f"{layer}/logit_lens_loss"] > 0 for layer in (1, 3))
    # the last layer read through the model's own head is the model: its logit lens is the model's own loss
    own = evaluate(model, iterate_batches(ExamplesSource(blocks), 8, 0), "causal-lm")["loss"]
    assert metrics["3/logit_lens_loss"] == pytest.approx(own, rel=1e-5)


@pytest.mark.parametrize("logits", ["topk:8", "sample:20", "full"])
def test_sparse_logits_round_trip(lm_assets, tmp_path, logits):
    cfg, path = extract_lm(lm_assets, tmp_path, family="gpt2", logits=logits)
    cache = Cache(path)
    meta = cache.metadata
    split = cache.split("train")
    vocab = meta.vocab_size
    width = vocab if logits == "full" else int(logits.split(":")[1])
    rows = split.logits(0, int(split.starts[-1] + split.lengths[-1]))
    assert rows["ids"].dtype == np.int8 and rows["ids"].shape[1] == width  # 35 ids fit in int8
    assert rows["logprobs"].dtype == np.float16 and ("counts" in rows) == logits.startswith("sample")
    device = pick_device()  # where extraction ran: the draws are made on the teacher's device
    teacher = load_causal_lm(cfg.teacher).to(device).eval()
    spec = parse_logit_spec(logits, vocab, cfg.logits_temperature)
    bounds = cache.root["train/unit_bounds"][...]
    for unit in range(meta.units["train"]):
        first, last = int(bounds[unit]), int(bounds[unit + 1])
        a, b = int(split.starts[first]), int(split.starts[last - 1] + split.lengths[last - 1])
        ids = torch.from_numpy(cache.root["train/input_ids"][a:b].astype(np.int64)).view(last - first, -1)
        with torch.no_grad():
            live = teacher(input_ids=ids.to(device)).logits.flatten(0, 1)
        expected = {k: v.cpu() for k, v in sparsify(live, spec, unit_generator(cfg.seed, unit, device)).items()}
        assert np.array_equal(rows["ids"][a:b], expected["ids"].numpy())
        assert np.allclose(rows["logprobs"][a:b].astype(np.float32), expected["logprobs"].float().numpy(), atol=2e-3)
        if "counts" in rows:
            assert np.array_equal(rows["counts"][a:b], expected["counts"].numpy())
            assert (rows["counts"][a:b].sum(-1) == 20).all()
    teacher_nll = cache.split("eval").teacher_nll
    assert teacher_nll.shape == (len(cache.split("eval")),) and np.isclose(teacher_nll.mean(), np.log(vocab), rtol=0.1)


def test_offline_and_live_losses_match(lm_assets, tmp_path):
    _, path = extract_lm(lm_assets, tmp_path, logits="topk:8")
    cache = Cache(path)
    student = load_causal_lm(str(lm_assets["llama_student"]))
    torch.manual_seed(0)
    bank = FilterBank(FilterSpec([0, 1], 32, 24))
    cfg = DistillConfig(cache=path, student="", out="", kl_alpha=1.0, mse_alpha=1.0, temperature=2.0)
    loss = Stage2Loss("causal-lm", "ted", 1.0, 1.0, 2.0, bank, kd_form=kd_form(cfg, cache.metadata))
    live = LiveTargets(str(lm_assets["llama"]), cache, [1, 3], torch.device("cpu"), seed=0)
    source = CacheSource(cache.split("train"), [1, 3], with_logits=True)
    student.eval()
    for batch in list(iterate_batches(source, 8, 0))[:3]:
        offline, offline_terms = stage2_step(student, loss, batch)
        online, online_terms = stage2_step(student, loss, live(batch))
        assert set(offline_terms) == {"task", "kl", "mse", "mse/0", "mse/1"}
        for key in offline_terms:
            assert torch.allclose(offline_terms[key], online_terms[key], rtol=2e-3, atol=1e-4), key


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_distill_lm_without_the_teacher(lm_assets, tmp_path, family):
    teacher = tmp_path / "teacher"
    shutil.copytree(lm_assets[family], teacher)
    lm_assets = {**lm_assets, family: teacher}
    _, path = extract_lm(lm_assets, tmp_path, family=family, logits="sample:20", precision="int8")
    shutil.rmtree(teacher)
    results = {}
    for method in ("finetune", "kd", "ted"):
        out = tmp_path / method
        distill(DistillConfig(cache=path, student=str(lm_assets[f"{family}_student"]), out=str(out), method=method,
                              student_layers="0,1", optim=OptimConfig(epochs=2, lr=3e-3, batch_size=8),
                              stage1=OptimConfig(epochs=1, lr=1e-2, batch_size=8)))
        report = json.loads((out / "metrics.json").read_text())
        results[method] = report
        assert report["test"]["perplexity"] == pytest.approx(np.exp(report["test"]["loss"]))
        assert load_causal_lm(str(out)) is not None
    assert results["kd"]["kd_targets"] == "sampled"
    assert {"task", "kl", "mse"} <= set(results["ted"]["history"][-1])
    assert "kl" not in results["finetune"]["history"][-1]
    teacher_ppl = results["ted"]["teacher"]["test"]["perplexity"]
    assert 1 < teacher_ppl < 2 * len(load_tokenizer(str(lm_assets[f"{family}_student"])))
    first, last = results["finetune"]["history"][0]["task"], results["finetune"]["history"][-1]["task"]
    assert last < first  # the student learns the text


def test_lm_refusals(lm_assets, tmp_path):
    _, path = extract_lm(lm_assets, tmp_path, logits="topk:8")
    other = make_lm(tmp_path / "other", "llama", layers=2, extra=["zebra"])  # one more word: another vocabulary
    result = run_cli("distill", "--cache", path, "--student", other, "--out", tmp_path / "out")
    assert result.returncode == 2 and "tokenizer vocabulary differs" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    result = run_cli("distill", "--cache", path, "--student", lm_assets["llama_student"], "--out", tmp_path / "o2",
                     "--method", "kd", "--kd-targets", "sampled")
    assert result.returncode == 2 and "--kd-targets logits" in result.stderr
    cfg = DistillConfig(cache=path, student="", out="", kd_targets="sampled", temperature=1.0)
    with pytest.raises(TedcacheError, match="sample"):
        kd_form(cfg, replace(Cache(path).metadata, logits={"kind": "sample", "size": 50, "temperature": 2.0}))
    for spec, message in (("full", "allowed up to"), ("topk:0", "is not sample"), ("sample:300", "is not sample")):
        with pytest.raises(TedcacheError, match=message):
            parse_logit_spec(spec, 49152, 2.0)
    result = run_cli("extract", "--teacher", lm_assets["llama"], "--data", lm_assets["train"], "--task", "causal-lm",
                     "--logits", "topk:x", "--cache-dir", tmp_path / "c2")
    assert result.returncode == 2 and result.stderr.startswith("error: --logits 'topk:x'")


def test_finetune_adapts_a_causal_lm_and_keeps_the_best_perplexity(lm_assets, tmp_path):
    """tedcache finetune --task causal-lm: next-token loss on packed blocks, best epoch by validation
    perplexity, saved with save_pretrained (extract takes the folder as a teacher)."""
    out = tmp_path / "adapted"
    result = run_cli("finetune", "--model", lm_assets["llama"], "--task", "causal-lm", "--block-size", "16",
                     "--data", lm_assets["train"], "--eval-data", lm_assets["eval"], "--out", out,
                     "--epochs", "3", "--lr", "3e-3", "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    perplexities = [e["perplexity"] for e in metrics["eval"]]
    assert len(perplexities) == 3 and perplexities[-1] < perplexities[0]  # the text is learnable
    assert metrics["best"]["perplexity"] == min(perplexities)
    model = load_causal_lm(str(out))
    tokenizer = load_tokenizer(str(out))
    data = DataConfig(train=[str(lm_assets["eval"])], task="causal-lm", block_size=16)
    blocks = load_blocks(data.train, data, tokenizer, "eval")
    batch = next(iterate_batches(ExamplesSource(blocks), 64, 0))
    from tedcache.losses import lm_loss

    with torch.no_grad():
        loss = lm_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                       batch["input_ids"], batch["attention_mask"])
    assert float(torch.exp(loss)) == pytest.approx(metrics["best"]["perplexity"], rel=1e-3)  # the best epoch was saved


def _padded(source: Path, folder: Path, extra_rows: int) -> Path:
    """`source` with its (tied) embedding and output layer padded by `extra_rows` rows that no token id
    reaches; the padded rows are made loud (large weights), so any use of them shows in the logits."""
    model = load_causal_lm(str(source))
    rows = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows + extra_rows, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[rows:] = 5.0 * model.get_output_embeddings().weight[:rows].abs().max()
    model.save_pretrained(folder)
    load_tokenizer(str(source)).save_pretrained(folder)
    return folder


def test_a_padded_teacher_keeps_only_its_tokenizers_ids(lm_assets, tmp_path):
    """A teacher whose output layer is wider than its tokenizer (padded vocabularies): the cache's rows
    span the tokenizer's ids, normalised over them, and an unpadded student distils from it."""
    padded = _padded(lm_assets["llama"], tmp_path / "padded", 7)
    ids_in_tokenizer = len(load_tokenizer(str(padded)))
    _, path = extract_lm({**lm_assets, "llama": padded}, tmp_path, logits="full")
    cache = Cache(path)
    assert cache.metadata.logits["vocab"] == ids_in_tokenizer and cache.metadata.vocab_size == ids_in_tokenizer + 7
    split = cache.split("train")
    rows = split.logits(0, 64)
    assert rows["ids"].shape[1] == ids_in_tokenizer and rows["ids"].max() == ids_in_tokenizer - 1
    assert np.allclose(np.exp(rows["logprobs"].astype(np.float64)).sum(-1), 1.0, atol=1e-2)  # over the tokenizer's ids
    report = distill(DistillConfig(cache=path, student=str(lm_assets["llama_student"]), out=str(tmp_path / "kd"),
                                   method="kd", optim=OptimConfig(epochs=1, batch_size=8), max_steps=2))
    assert np.isfinite(report["test"]["perplexity"])


def test_a_padded_student_is_compared_over_the_tokenizers_ids(lm_assets, tmp_path):
    """A student wider than the tokenizer: its extra rows are left out of KD (the KL equals the unpadded
    student's); a student narrower than the tokenizer is refused with one line."""
    _, path = extract_lm(lm_assets, tmp_path, logits="topk:8")
    cache = Cache(path)
    padded = load_causal_lm(str(_padded(lm_assets["llama_student"], tmp_path / "padded-student", 5))).eval()
    plain = load_causal_lm(str(lm_assets["llama_student"])).eval()
    batch = next(iterate_batches(CacheSource(cache.split("train"), [], with_logits=True), 8, 0))
    vocab = cache.metadata.logits["vocab"]
    kd = Stage2Loss("causal-lm", "kd", kl_alpha=1.0, temperature=2.0, vocab=vocab)
    _, wide = stage2_step(padded, kd, batch)
    _, narrow = stage2_step(plain, kd, batch)
    assert torch.allclose(wide["kl"], narrow["kl"], rtol=1e-5)
    _, unsliced = stage2_step(padded, Stage2Loss("causal-lm", "kd", kl_alpha=1.0, temperature=2.0), batch)
    assert not torch.allclose(unsliced["kl"], narrow["kl"], rtol=1e-3)  # the loud rows would have counted
    short = load_causal_lm(str(lm_assets["llama_student"]))
    short.resize_token_embeddings(vocab - 3)
    short.save_pretrained(tmp_path / "short")
    load_tokenizer(str(lm_assets["llama_student"])).save_pretrained(tmp_path / "short")
    result = run_cli("distill", "--cache", path, "--student", tmp_path / "short", "--out", tmp_path / "out",
                     "--method", "kd")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"fewer than the {vocab} token ids" in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_logits_rebuild_the_teachers_exact_distribution(lm_assets, tmp_path, family):
    """--logits hidden: the cache holds each training token's final hidden state and the output layer once;
    the logits rebuilt from them are the teacher's own, and the loss built on them is the full KD loss."""
    cfg, path = extract_lm(lm_assets, tmp_path, family=family, logits="hidden")
    cache = Cache(path)
    split = cache.split("train")
    assert split.has_final and not split.logit_rows and cache.metadata.logits["kind"] == "hidden"
    teacher = load_causal_lm(cfg.teacher).eval()
    head = cache.teacher_head()
    assert torch.equal(head["weight"], teacher.get_output_embeddings().weight.detach())
    source = CacheSource(split, [], with_logits=True)
    batch = next(iterate_batches(source, 8, 0))
    assert "teacher_states" not in batch  # KD reads the final states alone
    with torch.no_grad():
        live = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    rebuilt = head_logits(batch["teacher_hidden"].widen(), head)
    assert torch.allclose(rebuilt[real], live[real], atol=1e-5)  # fp32 cache: the teacher's logits
    student_logits = torch.randn_like(live)
    expected = kd_loss(student_logits[real], live[real], 2.0)
    assert torch.allclose(hidden_kd_loss(student_logits, batch["teacher_hidden"].widen(), head, 2.0,
                                         batch["attention_mask"]), expected, rtol=1e-5)


def test_hidden_kd_loss_is_chunk_independent_and_offline_matches_live(lm_assets, tmp_path, monkeypatch):
    _, path = extract_lm(lm_assets, tmp_path, logits="hidden", precision="int8")
    cache = Cache(path)
    assert cache.split("train").state_bytes_per_token(FINAL) == 32 + 2  # int8 values and a per-token scale
    student = load_causal_lm(str(lm_assets["llama_student"])).eval()
    torch.manual_seed(0)
    bank = FilterBank(FilterSpec([0, 1], 32, 24))
    cfg = DistillConfig(cache=path, student="", out="", kl_alpha=1.0, mse_alpha=1.0, temperature=1.0)
    form = kd_form(cfg, cache.metadata)
    assert form == "hidden" and kd_form(replace(cfg, kd_targets="logits"), cache.metadata) == "hidden"
    head, vocab = cache.teacher_head(), cache.metadata.logits["vocab"]
    live = LiveTargets(str(lm_assets["llama"]), cache, [1, 3], torch.device("cpu"))
    source = CacheSource(cache.split("train"), [1, 3], with_logits=True)
    loss = Stage2Loss("causal-lm", "ted", 1.0, 1.0, 1.0, bank, kd_form=form, vocab=vocab, head=head)
    for batch in list(iterate_batches(source, 8, 0))[:2]:
        offline, terms = stage2_step(student, loss, batch)
        online, live_terms = stage2_step(student, loss, live(batch))
        assert set(terms) == {"task", "kl", "mse", "mse/0", "mse/1"}
        assert torch.allclose(terms["kl"], live_terms["kl"], rtol=2e-2)  # int8 final states against fp32 live ones
        monkeypatch.setattr(losses, "HEAD_CHUNK", 5)  # many chunks, the last one short
        _, chunked = stage2_step(student, loss, batch)
        monkeypatch.undo()
        assert torch.allclose(chunked["kl"], terms["kl"], rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_losses_from_the_final_states_through_the_head_equal_those_from_whole_logits(lm_assets, tmp_path, family,
                                                                                       monkeypatch):
    """from_head (the default for exact KD targets): the same terms and the same gradients, the logits never
    whole; HEAD_CHUNK 5 cuts each batch into many chunks, the last one short."""
    _, path = extract_lm(lm_assets, tmp_path, family=family, logits="hidden")
    cache = Cache(path)
    student = load_causal_lm(str(lm_assets[f"{family}_student"])).eval()
    torch.manual_seed(0)
    bank = FilterBank(FilterSpec([0, 1], 32, 24))
    head, vocab = cache.teacher_head(), cache.metadata.logits["vocab"]
    batch = next(iter(iterate_batches(CacheSource(cache.split("train"), [1, 3], with_logits=True), 8, 0)))
    monkeypatch.setattr(losses, "HEAD_CHUNK", 5)
    results = []
    for from_head in (False, True):
        loss = Stage2Loss("causal-lm", "ted", 1.0, 1.0, 1.0, bank, kd_form="hidden", vocab=vocab, head=head,
                          from_head=from_head)
        student.zero_grad()
        bank.zero_grad()
        total, terms = stage2_step(student, loss, batch)
        total.backward()
        grads = {n: p.grad.clone() for n, p in [*student.named_parameters(), *bank.named_parameters()]
                 if p.grad is not None}
        results.append((terms, grads))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert set(chunked) == set(whole) == {"task", "kl", "mse", "mse/0", "mse/1"}
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(chunked_grads) == sorted(whole_grads) and len(whole_grads) > 10
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_hidden_logits_distill_verify_and_refusal(lm_assets, tmp_path):
    _, path = extract_lm(lm_assets, tmp_path, family="gpt2", logits="hidden", precision="int8")
    out = tmp_path / "kd"
    distill(DistillConfig(cache=path, student=str(lm_assets["gpt2_student"]), out=str(out), method="kd",
                          optim=OptimConfig(epochs=1, lr=3e-3, batch_size=8)))
    report = json.loads((out / "metrics.json").read_text())
    assert report["kd_targets"] == "hidden" and report["config"]["temperature"] == 1.0  # the cache's temperature
    assert all("kl" in row for row in report["history"])
    assert 0 < report["stage2_median_step_s"] <= report["stage2_seconds"]
    assert 0 < report["stage2_data_wait_share"] < 1  # the first batch is always waited for
    # the CPU peak is the whole process's resident memory: at least the student's fp32 weights
    weights_mb = sum(p.numel() * 4 for p in load_causal_lm(str(out)).parameters()) / 2**20
    assert report["stage2_peak_memory_mb"] > weights_mb
    assert verify(path) == []
    head_file = Path(path) / HEAD_FILE
    head_file.write_bytes(head_file.read_bytes()[:-8] + b"\0" * 8)
    assert any(HEAD_FILE in str(p) and "corrupt" in str(p) for p in verify(path))
    teacher = load_causal_lm(str(lm_assets["llama"])).eval()
    hidden = torch.randn(6, 32)
    head = {"weight": teacher.get_output_embeddings().weight.detach()}
    check_rebuilt(head_logits(hidden, head), hidden, head)  # the teacher's own logits pass
    with pytest.raises(TedcacheError, match="--logits hidden"):  # soft-capped or scaled logits (Gemma 2, Cohere)
        check_rebuilt(30 * torch.tanh(head_logits(hidden, head) / 3), hidden, head)
    sizes = inspect_cache(path)  # per token: final states 32 int8 values + an fp16 scale; two layers of 24 + 2
    assert sizes["logit_bytes"] / sizes["state_bytes"] == pytest.approx(34 / 52, rel=0.05)
    assert sizes["head_bytes"] > Cache(path).metadata.logits["vocab"] * 32 * 4  # the output layer, fp32, apart


@pytest.mark.parametrize("logits", ["topk:8", "hidden"])
def test_a_logits_only_lm_cache_trains_kd(lm_assets, tmp_path, logits):
    """--states none for a causal LM: no Stage I and no layer states, only the per-token targets (for
    --logits hidden, the final states they are rebuilt from); KD trains from it."""
    _, path = extract_lm(lm_assets, tmp_path, logits=logits, states="none")
    meta = Cache(path).metadata
    assert meta.layers == [] and meta.stage1 is None and meta.lm_head is None
    assert Cache(path).split("train").has_final == (logits == "hidden")
    report = distill(DistillConfig(cache=path, student=str(lm_assets["llama_student"]), out=str(tmp_path / "kd"),
                                   method="kd", optim=OptimConfig(epochs=1, batch_size=8), max_steps=2))
    assert report["kd_targets"] == ("hidden" if logits == "hidden" else "logits") and "kl" in report["history"][-1]
