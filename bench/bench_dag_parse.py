"""Benchmark: wall time to parse both DAG files in a fresh interpreter (Airflow itself already imported).

Run by hand, through the stack's environment:
    .venv/bin/python scripts/stack.py run -- .venv/bin/python bench/bench_dag_parse.py
Prints the median of `--repeats` fresh processes; tests only check what parsing imports.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.images import cpu_flags  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CODE = (
    "import time, importlib.util\n"
    "import airflow\n"
    "t = time.perf_counter()\n"
    "for name in ('image_classification', 'image_classification_inbox'):\n"
    f"    spec = importlib.util.spec_from_file_location(name, r'{REPO}/dags/' + name + '.py')\n"
    "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    "print(time.perf_counter() - t)\n"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times = []
    for _ in range(args.repeats):
        out = subprocess.run(
            [sys.executable, "-c", CODE], capture_output=True, text=True, check=True
        )
        times.append(float(out.stdout.split()[-1]))
    print(
        f"DAG parse: median {statistics.median(times):.3f}s over {args.repeats} processes"
        f" (min {min(times):.3f}s, max {max(times):.3f}s); CPU flags: {cpu_flags()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
