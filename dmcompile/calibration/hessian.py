"""Second moments of a layer's inputs, H = E[x x^T] over its input columns, for GPTQ rounding.

A Conv's columns are its im2col rows (C * kh * kw values per output position, in the order of
``calibration.rounding.weight_matrix``); a Gemm / MatMul's are the last axis. Gathered in the
calibration pass by :class:`MomentRecorder` (one sweep: the calibration's), saved next to
the histograms and read back one layer at a time by :class:`Moments`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArtifactError

__all__ = ["LayerColumns", "MomentRecorder", "Moments", "SecondMoment", "im2col", "layer_columns", "moments_bytes"]


def im2col(x: np.ndarray, kernel: tuple[int, int], strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)) -> np.ndarray:
    """[B, C, H, W] -> [B * Ho * Wo, C * kh * kw]: each row the input patch one output position
    of a (group 1) Conv reads, columns ordered (C, kh, kw) like a flattened Conv weight. ``pads``
    in ONNX order (top, left, bottom, right)."""
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    B, C, H, W = x.shape
    ho = (H - dh * (kh - 1) - 1) // sh + 1
    wo = (W - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((B, C, kh, kw, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(B * ho * wo, C * kh * kw)


class SecondMoment:
    """Running E[x x^T] (float64) over the rows added; ``max_rows`` per call subsamples rows
    (seeded) so that a large feature map costs a bounded matmul."""

    def __init__(self, n: int, max_rows: int | None = None, seed: int = 0):
        self.sum = np.zeros((n, n), np.float64)
        self.count = 0
        self.max_rows = max_rows
        self.rng = np.random.default_rng(seed)

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.float64).reshape(-1, self.sum.shape[0])
        if self.max_rows is not None and len(rows) > self.max_rows:
            rows = rows[self.rng.choice(len(rows), self.max_rows, replace=False)]
        self.sum += rows.T @ rows
        self.count += len(rows)

    def matrix(self) -> np.ndarray:
        if not self.count:
            raise ValueError("no rows were added")
        return self.sum / self.count

    @staticmethod
    def pooled(parts: list[SecondMoment], weights: list[float]) -> np.ndarray:
        """The weighted mean of several groups' moments (e.g. by sampling steps per group)."""
        w = np.asarray(weights, np.float64)
        return sum(wi * p.matrix() for wi, p in zip(w / w.sum(), parts))


MOMENT_ROWS = 256  # input rows per layer per call: 2 * 256 * n^2 flops, bounded for the largest layers
MOMENTS = "moments"  # folder of the calibration cache that holds them
MAX_MOMENTS_BYTES = 8 * 10**9  # beyond this a model's moments (and GPTQ on them) are refused: use rtn
MOMENTS_SCHEMA_VERSION = 2  # 2: pooled sums the same whether groups are kept or not


@dataclass(frozen=True)
class LayerColumns:
    """How a weighted layer's input becomes rows over its weight's input columns: the input
    tensor, the column count ``n`` and, for a Conv, its kernel geometry (im2col)."""

    node: str
    tensor: str
    n: int
    conv: dict | None = None  # kernel, strides, pads, dilations

    def rows(self, x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """``k`` rows (float32, [k, n]) drawn uniformly from every output position of ``x``."""
        if self.conv is None:
            flat = x.reshape(-1, self.n)
            pick = rng.integers(0, len(flat), k) if len(flat) > k else np.arange(len(flat))
            return np.asarray(flat[pick], np.float32)
        (kh, kw), (sh, sw), p, (dh, dw) = (self.conv[a] for a in ("kernel", "strides", "pads", "dilations"))
        x = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
        B, C, H, W = x.shape
        ho, wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
        total = B * ho * wo
        pos = rng.integers(0, total, k) if total > k else np.arange(total)
        b, r = np.divmod(pos, ho * wo)
        oh, ow = np.divmod(r, wo)
        ih = (oh * sh)[:, None, None] + (np.arange(kh) * dh)[None, :, None]
        iw = (ow * sw)[:, None, None] + (np.arange(kw) * dw)[None, None, :]
        patch = x[b[:, None, None], :, ih, iw]  # [k, kh, kw, C]
        return np.ascontiguousarray(patch.transpose(0, 3, 1, 2), np.float32).reshape(len(pos), self.n)


def input_columns(layer) -> int:
    """Columns of a weighted layer's [out, in] weight (``rounding.weight_matrix``): C * kh * kw
    for a Conv, in_features for a Gemm [out, in] or a MatMul [in, out]."""
    shape = layer.weight_shape
    return int(shape[0]) if layer.op_type == "MatMul" else int(np.prod(shape[1:]))


def moments_bytes(layers, scopes: int = 1) -> int:
    """Bytes of float32 second moments for ``layers`` (from the layer map's weight shapes), per
    scope times ``scopes`` (1 pooled, or 1 + K with per-group moments)."""
    return 4 * sum(input_columns(l) ** 2 for l in layers if l.weight) * scopes


def layer_columns(model, layers) -> dict[str, LayerColumns]:
    """Per weighted layer of ``model`` (the fp32 graph), how its input is read. A grouped Conv
    (its H is block-diagonal per group) is left out: it keeps round-to-nearest."""
    nodes = {n.name: n for n in model.graph.node}
    out = {}
    for layer in layers:
        if not layer.weight:
            continue
        shape = layer.weight_shape
        if layer.op_type == "Conv":
            a = {at.name: (list(at.ints) or at.i) for at in nodes[layer.node].attribute}
            if a.get("group", 1) != 1 or len(shape) != 4:
                continue
            conv = {"kernel": tuple(shape[2:]), "strides": tuple(a.get("strides") or (1, 1)),
                    "pads": tuple(a.get("pads") or (0, 0, 0, 0)), "dilations": tuple(a.get("dilations") or (1, 1))}
            out[layer.node] = LayerColumns(layer.node, layer.activation_input, input_columns(layer), conv)
        else:
            out[layer.node] = LayerColumns(layer.node, layer.activation_input, input_columns(layer))
    return out


class MomentRecorder:
    """Running sums of x x^T per layer, pooled over all groups and, with ``groups``, one per
    group too, kept in float32 ``.npy`` files memory-mapped from ``folder`` (a model's moments
    can exceed memory: 1.5 GB per scope for ddpm-cifar10-32, 28 GB for the SD 1.5 UNet). The
    pooled sums are the same bytes whether groups are kept or not (same rows, same order).
    ``finish`` turns the sums into means and writes ``moments.json``."""

    def __init__(self, folder: Path, columns: dict[str, LayerColumns], groups: int | None, seed: int,
                 rows: int | None = None, stream: int = 0):
        self.folder, self.columns, self.groups, self.rows = Path(folder), columns, groups, rows or MOMENT_ROWS
        # its own stream (histograms stay as they were), one per shard of the pass (``stream``)
        self.rng = np.random.default_rng([seed, 0x4E55, stream])
        self.scopes = ["pooled", *(f"g{g}" for g in range(groups or 0))]
        self.index = {node: i for i, node in enumerate(columns)}
        self.tensors = {c.tensor for c in columns.values()}  # the layer inputs each call must fetch
        self.counts = {s: np.zeros(len(columns), np.int64) for s in self.scopes}
        self._open = {}

    def _sum(self, scope: str, node: str) -> np.ndarray:
        key = (scope, node)
        if key not in self._open:
            path = self.folder / scope / f"{self.index[node]:04d}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            n = self.columns[node].n
            if path.is_file():  # sums carried over from a checkpoint
                self._open[key] = np.lib.format.open_memmap(path, mode="r+")
            else:
                self._open[key] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, n))
        return self._open[key]

    def flush(self) -> None:
        for s in self._open.values():
            s.flush()

    def close(self) -> None:
        """Write the sums out and let go of their files (another process reads them next)."""
        self.flush()
        self._open.clear()

    def move_to(self, folder: Path) -> None:
        """Write the sums out and go on in ``folder`` (a checkpoint's copy of them)."""
        self.close()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def state(self) -> dict:
        return {"counts": {s: c.tolist() for s, c in self.counts.items()}, "rng": self.rng.bit_generator.state}

    def restore(self, state: dict) -> None:
        self.counts = {s: np.asarray(c, np.int64) for s, c in state["counts"].items()}
        self.rng.bit_generator.state = state["rng"]

    def add(self, group: int, values: dict[str, np.ndarray]) -> None:
        """A call's layer inputs (tensor -> array, rows already masked) for timestep group
        ``group``: all of them, or a share (a call run in pieces hands them in share by share,
        each in column order, so the rows drawn are the same)."""
        scopes = ["pooled", f"g{group}"] if self.groups else ["pooled"]
        for node, col in self.columns.items():
            x = values.get(col.tensor)
            if x is None or not x.size:
                continue
            r = col.rows(x, self.rows, self.rng)
            xx = r.T @ r
            for scope in scopes:  # pooled: the same sums in the same order whether groups are kept or not
                s = self._sum(scope, node)
                s += xx
                self.counts[scope][self.index[node]] += len(r)

    def absorb(self, other: "MomentRecorder") -> None:
        """Add the sums and counts of ``other`` (a shard's recorder over the same layers) to
        these; the shard's folder is removed. Folded in shard order, the sums are the same bytes
        however many processes gathered the shards."""
        other.close()
        for scope in self.scopes:
            for node in self.columns:
                path = other.folder / scope / f"{other.index[node]:04d}.npy"
                if path.is_file():
                    s = self._sum(scope, node)
                    s += np.load(path, mmap_mode="r")
            self.counts[scope] += other.counts[scope]
        shutil.rmtree(other.folder, ignore_errors=True)

    def finish(self) -> None:
        """Sums -> means, per scope."""
        for scope in self.scopes:
            for node in self.columns:
                if (scope, node) in self._open or (self.folder / scope / f"{self.index[node]:04d}.npy").is_file():
                    s = self._sum(scope, node)
                    s /= max(int(self.counts[scope][self.index[node]]), 1)
                    s.flush()
        self._open.clear()
        (self.folder / "moments.json").write_text(json.dumps({
            "schema_version": MOMENTS_SCHEMA_VERSION, "rows_per_call": self.rows, "groups": self.groups,
            "layers": [{"node": c.node, "tensor": c.tensor, "n": c.n, "file": f"{i:04d}.npy"}
                       for i, c in enumerate(self.columns.values())],
            "counts": {s: c.tolist() for s, c in self.counts.items()}}, indent=1))


class Moments:
    """Saved second moments (a calibration's ``moments/`` folder): ``matrix(node, groups)``
    reads one layer's H (float64) pooled over all groups, or the count-weighted mean of the
    groups named (per-group moments needed), one layer at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            meta = json.loads((self.folder / "moments.json").read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read second moments in {folder}: {e}; delete the calibration to "
                                "measure them again") from e
        if meta.get("schema_version") != MOMENTS_SCHEMA_VERSION:
            raise ArtifactError(f"second moments in {folder} have schema_version {meta.get('schema_version')}; "
                                "delete the calibration to measure them again")
        self.meta = meta
        self.files = {l["node"]: l["file"] for l in meta["layers"]}
        self.index = {l["node"]: i for i, l in enumerate(meta["layers"])}

    @property
    def per_group(self) -> bool:
        return bool(self.meta["groups"])

    def identity(self) -> list:
        """What the pooled moments depend on beyond the calibration's key (for caches of results)."""
        return [self.meta["schema_version"], self.meta["rows_per_call"], self.meta["counts"]["pooled"]]

    def matrix(self, node: str, groups: tuple[int, ...] | None = None) -> np.ndarray | None:
        """H of layer ``node``; None when the layer has none (a grouped Conv, an input no
        recorded call reached)."""
        if node not in self.files or not self.meta["counts"]["pooled"][self.index[node]]:
            return None  # no moments for this layer (a grouped Conv, or never reached): round to nearest
        if groups is None:
            return np.load(self.folder / "pooled" / self.files[node]).astype(np.float64)
        if not self.per_group:
            raise ArtifactError("these moments are pooled only; per-group weights need per-group moments")
        c = np.array([self.meta["counts"][f"g{g}"][self.index[node]] for g in groups], np.float64)
        if not c.sum():  # groups no recorded step fell in (PTQ4DM's timestep sampling can miss one)
            return self.matrix(node)
        return sum(w * np.load(self.folder / f"g{g}" / self.files[node]).astype(np.float64)
                   for w, g in zip(c / c.sum(), groups) if w > 0)
