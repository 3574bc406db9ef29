"""Runtime-only benchmark of one or more bundles: what a deployment engineer measures on the target.

    python benchmarks/bench_runtime.py BUNDLE [--compare BUNDLE2 ...] [--batch 1 8] [--steps 50]
                                       [--repeats 20] [--runs 3] [--threads 0] [--no-memory]

The same benchmark as ``dmcompile bench`` (``dmruntime.bench``), for machines where only the runtime
is installed (a board, the runtime container): imports only dmruntime, numpy, onnxruntime and the
standard library.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes" / "python"))

from dmruntime.bench import emulated, main, manifest_figures, peak_memory  # noqa: E402

__all__ = ["emulated", "main", "manifest_figures", "peak_memory"]

if __name__ == "__main__":
    raise SystemExit(main())
