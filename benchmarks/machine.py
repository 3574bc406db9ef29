"""The line every timing is printed with: CPU model, its int8 features, core count, versions.
ONNX Runtime picks different int8 kernels on CPUs with and without VNNI / AMX."""

from __future__ import annotations

import os
import platform
from pathlib import Path

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "asimddp", "i8mm", "sve", "sme")


def cpu_line() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    have = [f for f in INT8_FLAGS if f in flags]
    try:
        import onnxruntime

        ort = f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        ort = "onnxruntime not installed"
    return (f"CPU: {model} ({os.cpu_count()} cores visible); int8 features: {', '.join(have) or 'none found'}; "
            f"{ort}; {platform.system()} {platform.machine()}")


if __name__ == "__main__":
    print(cpu_line())
