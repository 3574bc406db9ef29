"""The line every timing is printed with: CPU model, its int8 features, core count, versions
(``dmruntime.bench.cpu_line``). ONNX Runtime picks different int8 kernels on CPUs with and
without VNNI / AMX."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtimes" / "python"))

from dmruntime.bench import INT8_FLAGS, cpu_line  # noqa: E402

__all__ = ["INT8_FLAGS", "cpu_line"]

if __name__ == "__main__":
    print(cpu_line())
