#!/usr/bin/env bash
# Run once, here, from the repository root (after `make install`): what examples/gpu/run.sh needs on a lent
# GPU machine that cannot reach a package index or hold the asset packages.
#   .whl/        wheels (Python 3.12, x86-64) of the packages the machine's image lacks
#   .gpu-assets/ MiniLM's and SmolLM2's configs and tokenizers, no weights (the benches time shapes)
# Then, on the machine, with .whl and .gpu-assets carried: bash examples/gpu/run.sh
set -euo pipefail
rm -rf .whl .gpu-assets && mkdir -p .whl .gpu-assets
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 optuna==5.1.0 alembic==1.20.1 colorlog==6.12.0 Mako==1.4.3 SQLAlchemy==2.1.9 \
  scattertext==0.2.2
HF_HUB_OFFLINE=1 .venv/bin/python - <<'PY'
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from tedcache.demos.demo import minilm_path
from tedcache.demos.demo_lm import smollm2

for name, source in (("minilm", minilm_path()),
                     ("smollm2", smollm2(Path.home() / ".cache" / "tedcache" / "smollm2-135m-instruct"))):
    AutoTokenizer.from_pretrained(source).save_pretrained(f".gpu-assets/{name}")
    AutoConfig.from_pretrained(source).save_pretrained(f".gpu-assets/{name}")
PY
du -sh .whl .gpu-assets
