"""Helpers the benchmark scripts share: the timing options, an ONNX Runtime session with a
thread count, and ONNX Runtime's own quantize_static as the baseline a user would pick."""

from __future__ import annotations

import argparse
from pathlib import Path


def timing_parser(doc: str, repeats: int, models=("digits16", "ddpm-cifar10-32")) -> argparse.ArgumentParser:
    """A parser with --models, --batches, --repeats and --threads (2: this machine's cores)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(models))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--threads", type=int, default=2)
    return p


def ort_session(path: Path, threads: int):
    """An ONNX Runtime CPU session over an ONNX file with ``threads`` intra-op threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_quantize_static(fp_model: Path, out: Path, inputs: list[dict], external_data: bool = False) -> Path:
    """ONNX Runtime's quantize_static: QDQ, per-channel int8 weights, uint8 activations, MinMax
    over ``inputs`` (feeds dicts). ``external_data``: for models past protobuf's 2 GB limit."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(inputs)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp_model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external_data)
    return out
