"""Engines that carry their groups' scales (openvino-cpu, tensorrt): one QDQ graph per group, or
per run of adjacent groups merged by their activation ranges (``--max-engines``), written as
they are lowered, their big initializers once in ``weights.bin``."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import set_external_data

from ..quant import merge_ranges
from .base import EngineJob, EngineSet

WEIGHTS_FILE = "weights.bin"
MIN_EXTERNAL_BYTES = 1024  # smaller tensors (scales, zero points) stay in the graph
ALIGN = 64


def engine_file(index: int) -> str:
    return f"unet_e{index:02d}.onnx"


def cluster_groups(ranges: list[dict[str, tuple[float, float]]], widths: list[tuple], max_engines: int | None
                   ) -> list[list[int]]:
    """Adjacent groups merged, closest activation scales first, until ``max_engines`` remain.

    Distance of two neighbouring clusters: the mean over tensors of |log(scale_a / scale_b)|,
    scale = (hi - lo) of the cluster's merged range (the union of its groups' ranges). Groups
    with different weight widths are never merged (their weights differ). Returns the clusters,
    each a list of group indices in order; without a bound, one cluster per group."""
    clusters = [[g] for g in range(len(ranges))]
    merged = [dict(r) for r in ranges]
    if max_engines is None:
        return clusters

    def width(r):
        return np.array([max(hi - lo, 1e-12) for lo, hi in r.values()])

    def distance(i):
        if widths[clusters[i][0]] != widths[clusters[i + 1][0]]:
            return np.inf
        return float(np.mean(np.abs(np.log(width(merged[i]) / width(merged[i + 1])))))

    while len(clusters) > max_engines:
        d = [distance(i) for i in range(len(clusters) - 1)]
        i = int(np.argmin(d)) if d else 0
        if not d or not np.isfinite(d[i]):
            break  # only groups with different weights are left: they cannot share an engine
        merged[i] = merge_ranges([merged[i], merged[i + 1]])
        clusters[i] += clusters.pop(i + 1)
        merged.pop(i + 1)
    return clusters


class SharedWeights:
    """Writes engines whose big initializers go once into one ``weights.bin`` (deduplicated by
    content), each engine file referencing it by offset."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.offsets: dict[bytes, tuple[int, int]] = {}
        self.size = 0
        self._f = open(self.folder / WEIGHTS_FILE, "wb")

    def add(self, model: onnx.ModelProto, name: str) -> str:
        """Move ``model``'s initializers of MIN_EXTERNAL_BYTES or more to weights.bin, save it as
        ``name``; returns name."""
        for init in model.graph.initializer:
            raw = init.raw_data or onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init)).raw_data
            if len(raw) < MIN_EXTERNAL_BYTES:
                continue
            key = hashlib.sha256(raw).digest() + init.data_type.to_bytes(2, "little")
            if key not in self.offsets:
                pad = -self.size % ALIGN
                self._f.write(b"\0" * pad)
                self.offsets[key] = (self.size + pad, len(raw))
                self._f.write(raw)
                self.size += pad + len(raw)
            offset, length = self.offsets[key]
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(field)
            set_external_data(init, location=WEIGHTS_FILE, offset=offset, length=length)
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
        onnx.save(model, str(self.folder / name))
        return name

    def close(self) -> list[str]:
        self._f.close()
        return [WEIGHTS_FILE]


def emit_qdq_engines(folder: Path, job: EngineJob, finish: Callable[[onnx.ModelProto], onnx.ModelProto] | None,
                     report: Callable[[Path], dict]) -> EngineSet:
    """One QDQ graph per engine (a group, or adjacent groups merged down to ``job.max_engines``),
    each made the runtime's by ``finish`` and written as lowered (one graph in memory at a
    time), the weights they share going once into weights.bin; ``report(path)`` counts one
    engine's integer layers, once per distinct weight layout."""
    K = job.groups
    clusters = cluster_groups(job.ranges, [tuple(job.bits[g]) for g in range(K)], job.max_engines)
    writer = SharedWeights(folder)
    engines, engine_of, first, layout = {}, {}, {}, {}
    try:
        for c, (widths, _), model in job.lower(clusters, job.ranges):
            if finish is not None:
                model = finish(model)
            name = writer.add(model, engine_file(c))
            del model
            engines[name], first[name] = folder / name, clusters[c][0]
            layout.setdefault(widths, name)
            for g in clusters[c]:
                engine_of[g] = name
    finally:
        writer.close()
    # Engines of one layout differ only in scales: the runtime treats them alike.
    reports = {name: report(folder / name) for name in layout.values()}
    fusion = {name: reports[layout[tuple(int(b) for b in job.bits[first[name]])]] for name in engines}
    return EngineSet(tuple(engines), tuple(engine_of[g] for g in range(K)), tuple({} for _ in range(K)), first,
                     fusion, [*engines, WEIGHTS_FILE])
