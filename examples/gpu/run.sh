#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one run (planned at under 8 minutes on an H200), from the
# repository root of a machine that holds .whl and .gpu-assets from examples/gpu/prepare.sh. Results go
# to $OUT (or ./gpu-results): tests.log (the side-stream copies on the GPU), pairs.json (`bench --steps 60`), big.json (`bench --profile big`),
# extraction.jsonl (extraction / bare forward: writer process or thread, extract --compile on or off),
# their logs, and the machine's description.
set -uo pipefail
py=${PY:-python3}  # what is missing is installed into /tmp/site
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
$py -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(n) is None for n in sys.argv[1:]))" \
  zarr numcodecs optuna datasets scattertext \
  || $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
$py -c "import tedcache.cli.main" 2>/dev/null || {  # the source as installed: cli/ is the package tedcache.cli
  ln -sfn ../cli tedcache/cli && export PYTHONPATH=$PWD:$PYTHONPATH; }
export TEDCACHE_BENCH_MINILM=$PWD/.gpu-assets/minilm TEDCACHE_BENCH_SMOLLM2=$PWD/.gpu-assets/smollm2
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out=${OUT:-gpu-results}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  $py -c "import torch, transformers, zarr; print(torch.__version__, transformers.__version__, zarr.__version__)"
} > "$out/machine.txt" 2>&1
timeout 90 $py -m pytest -q -p no:cacheprovider tests/test_host_copies.py > "$out/tests.log" 2>&1
timeout 120 $py -m tedcache.cli.main bench --steps 60 --json --workdir /tmp/bench > "$out/pairs.json" 2> "$out/pairs.log"
timeout 300 $py -m tedcache.cli.main bench --profile big --json --workdir /tmp/bench > "$out/big.json" 2> "$out/big.log"
timeout 60 $py examples/extraction_vs_forward.py /tmp/bench "$out/extraction.jsonl" bert 8192:2 \
  process,thread,process+compile > /dev/null 2> "$out/extraction.log"
tail -n 3 "$out"/*.log
cat "$out/pairs.json" "$out/big.json" "$out/extraction.jsonl"
