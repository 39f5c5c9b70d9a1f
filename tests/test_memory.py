"""Extraction streams: its peak memory does not grow with the data set (states stay one unit at a time)."""

import json
import subprocess
import sys

from conftest import make_model, sentiment_rows, write_rows

MEASURE = """
import json, sys
from tedcache import DataConfig, ExtractConfig, FilterConfig, OptimConfig, extract
teacher, data, cache_dir = sys.argv[1:4]
extract(ExtractConfig(teacher=teacher, data=DataConfig(train=[data], max_length=24), precision="fp32",
                      filters=FilterConfig(dim=256), stage1=OptimConfig(epochs=0.01, batch_size=64),
                      cache_dir=cache_dir, shard_tokens=1024, batch_size=64))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across fork and exec
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_mb": peak / 1024}))
"""


def test_extraction_peak_memory_does_not_grow_with_the_data(tmp_path):
    teacher = make_model(tmp_path / "teacher", layers=4, hidden=256)
    peaks, tokens = {}, {}
    for n in (1500, 12000):
        data = write_rows(tmp_path / f"d{n}.csv", sentiment_rows(n, seed=n))
        out = subprocess.run([sys.executable, "-c", MEASURE, str(teacher), str(data), str(tmp_path / f"c{n}")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
        tokens[n] = sum(len(r["text"].split()) + 2 for r in sentiment_rows(n, seed=n))
    states_mb = {n: t * 4 * 256 * 4 / 2**20 for n, t in tokens.items()}  # 4 layers x 256 x fp32
    assert states_mb[12000] - states_mb[1500] > 400  # the larger set's states would not fit the budget below
    print(f"peak RSS MB {peaks}, state MB {states_mb}")
    assert peaks[12000] - peaks[1500] < 80, (peaks, states_mb)
