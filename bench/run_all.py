"""Run every CPU benchmark in turn (by hand: `make bench`); each writes bench/results/<name>.md.

bench_gpu.py is not among them: it runs on a CUDA machine (see its docstring).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main() -> int:
    failed = []
    for script in ("bench_scan.py", "bench_train.py", "bench_score.py"):
        print(f"=== {script}", flush=True)
        if subprocess.run([sys.executable, str(BENCH / script)], check=False).returncode != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
