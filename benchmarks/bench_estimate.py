"""Wall time of one `peftplan estimate` command (a benchmark, not a test).

Runs the installed console script N times in fresh processes and prints min / median / max.
Usage: python benchmarks/bench_estimate.py [N]
"""

import shutil
import statistics
import subprocess
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
exe = shutil.which("peftplan") or sys.exit("peftplan is not installed")
cmd = [exe, "estimate", "--model", "llama3-8b", "--method", "qlora", "--gpu", "t4", "--batch", "1", "--seq", "2048"]
times = []
for _ in range(N):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    times.append(time.perf_counter() - t0)
print(f"peftplan estimate (llama3-8b qlora t4), {N} runs: min {min(times):.3f} s, "
      f"median {statistics.median(times):.3f} s, max {max(times):.3f} s")
