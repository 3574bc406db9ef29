"""Reading and validating a bundle: manifest.json plus the engines it lists."""

from __future__ import annotations

import hashlib
import json
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .components import check_components, open_components
from .conditioning import Conditioning
from .correction import load_corrections
from .engine import check_sample
from .engines import EngineContext, engine_runtime
from .errors import BundleError, InputError
from .samplers import SamplerChoice
from .schedule import NoiseSchedule
from .schema import HINT, SCHEMAS, check_entry, check_manifest, is_relative_file
from .weights import load_weights

MANIFEST = "manifest.json"
SUPPORTED_SCHEMA_VERSIONS = tuple(SCHEMAS)
BUNDLE_KIND = "dmcompile-bundle"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Group:
    """A range [t_start, t_end) of training timesteps that shares activation statistics and, in a
    bundle, one engine (the compiler's calibration groups have none yet: ``engine`` empty)."""

    index: int
    t_start: int
    t_end: int
    engine: str = ""


def group_lookup(groups: list[Group] | tuple[Group, ...], num_train_timesteps: int) -> np.ndarray:
    """Table t -> group index for t in [0, T); raises BundleError unless groups partition [0, T)."""
    table = np.full(num_train_timesteps, -1, dtype=np.int64)
    for g in groups:
        if not 0 <= g.t_start < g.t_end <= num_train_timesteps:
            raise BundleError(f"group {g.index} has range [{g.t_start}, {g.t_end}) outside [0, {num_train_timesteps})")
        if (table[g.t_start:g.t_end] >= 0).any():
            raise BundleError(f"group {g.index} overlaps another group")
        table[g.t_start:g.t_end] = g.index
    if (table < 0).any():
        raise BundleError(f"groups leave timestep {int(np.argmax(table < 0))} uncovered")
    return table


class Bundle:
    """A compiled model on disk: manifest, noise schedule and one engine per timestep group.

    Use :meth:`open`; then ``bundle.predict(x, t)`` runs the engine of the group holding t.
    Thread-safe: several threads may call ``predict`` (and sample) at once; ONNX Runtime sessions
    run concurrently, OpenVINO engines give each thread its own infer request, TensorRT engines
    (one set of GPU buffers) take turns.
    """

    def __init__(self, root: Path, manifest: dict, *, threads: int = 0, correction: bool = True,
                 cache_dir: str | Path | None = None, openvino_config: dict | None = None,
                 device: str | None = None):
        self.root = root
        self.manifest = manifest
        model = manifest["model"]
        self.sample_shape = tuple(int(s) for s in model["sample_shape"])
        self.scheduler_config = manifest["scheduler"]
        try:
            self.schedule = NoiseSchedule.from_config(self.scheduler_config)
        except InputError as e:
            raise BundleError(f"manifest {e}; {HINT}") from None
        self.sampling = _sampling(manifest)
        self.groups = tuple(Group(int(g["index"]), int(g["t_start"]), int(g["t_end"]), g["engine"])
                            for g in manifest["groups"])
        self._lookup = group_lookup(self.groups, self.schedule.num_train_timesteps)
        # Class labels / cross-attention embeddings the UNet reads, and the null condition of guidance.
        self.conditioning = Conditioning.from_manifest(manifest, root)
        # Graphs shipped beside the UNet (the VAE decoder of latent models), by manifest key.
        self.components = open_components(root, manifest, threads=threads)
        # PTQD noise correction, on when the manifest carries its statistics (and not turned off).
        self.corrections = load_corrections(manifest, self.sample_shape[0]) if correction else None
        # Groups may share one engine and differ only in the inputs they feed it.
        # (read on a group's first use: hundreds of small arrays each, and a sampler may not visit all)
        self._input_files = [g.get("inputs") for g in manifest["groups"]]
        self._inputs: dict[int, dict | None] = {}
        # Low-bit weights stored outside the engines (4-bit packed), expanded once and shared.
        stored = load_weights(root, manifest["weights"]) if manifest.get("weights") else {}
        self.runtime = (manifest.get("engine") or {}).get("runtime", "onnxruntime")
        runtime = engine_runtime(self.runtime)
        self.device = runtime.device(device)
        ctx = EngineContext(root, manifest, self.sample_shape, self.conditioning, stored, threads, cache_dir,
                            {"openvino_config": openvino_config})
        self._engines = runtime.open(ctx, list(dict.fromkeys(g.engine for g in self.groups)), self.device)
        self._active = None  # the engine of the last call (its activations are freed when another runs)
        self._lock = threading.Lock()

    def engine(self, name: str):
        """The engine (OnnxEngine, OpenVinoEngine or TensorRT's GroupEngine) behind one engine file."""
        return self._engines[name]

    @property
    def decoder(self):
        """The VAE decoder component of a latent bundle (None otherwise)."""
        return self.components.get("decoder")

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, threads: int = 0, correction: bool = True,
             cache_dir: str | Path | None = None, openvino_config: dict | None = None,
             device: str | None = None) -> Bundle:
        """Open and validate a bundle folder.

        Checks the schema version, that every listed file stays inside the folder, exists
        and (with ``verify``) matches its sha256, and that the groups partition the training
        timesteps. Raises :class:`BundleError` with what is wrong otherwise. Engine sessions
        are created on first use and reused; groups that share an engine share its session.
        ``correction``: apply the bundle's PTQD noise correction when it has one (default).
        OpenVINO bundles (target openvino-cpu): ``cache_dir`` holds OpenVINO's compile cache
        (a second start imports the compiled models instead of compiling them);
        ``openvino_config`` adds or replaces compile properties (e.g.
        ``{"INFERENCE_PRECISION_HINT": "bf16"}``; the manifest's default is f32).
        TensorRT bundles (target tensorrt): ``device`` "cuda" (default) runs the TensorRT engines
        built on this machine (``python -m dmruntime.tensorrt.build BUNDLE`` builds them; needs the
        ``tensorrt`` extra and an NVIDIA GPU); "cpu" runs ONNX Runtime over the engines' FP16 ONNX
        (the same quantization, a reference for checks, slow).
        """
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise InputError(f"threads must be an integer >= 0 (0: the runtime's default), got {threads!r}")
        root = Path(path)
        if not root.is_dir():
            raise BundleError(f"bundle folder {root} does not exist; build or export one first")
        mpath = root / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise BundleError(f"{root} has no {MANIFEST}: not a bundle (an interrupted build leaves none)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}); rebuild the bundle") from None
        validate_manifest(manifest, root, verify=verify)
        return cls(root.resolve(), manifest, threads=threads, correction=correction, cache_dir=cache_dir,
                   openvino_config=openvino_config, device=device)

    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    def group_of(self, t: int) -> Group:
        """The group whose [t_start, t_end) holds training timestep t."""
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer, float, np.floating)) or \
                not np.isfinite(t) or int(t) != t:
            raise InputError(f"timestep must be one integer training timestep, got {t!r}")
        if not 0 <= int(t) < self.num_train_timesteps:
            raise InputError(f"timestep {t} outside [0, {self.num_train_timesteps})")
        return self.groups[int(self._lookup[int(t)])]

    def group_inputs(self, t: int) -> dict | None:
        """The extra engine inputs (quantization parameters) of t's group, if any."""
        return self._group_inputs(self.group_of(t).index)

    def _group_inputs(self, index: int) -> dict | None:
        if index not in self._inputs:
            name = self._input_files[index]
            self._inputs[index] = load_group_inputs(self.root, name) if name else None
        return self._inputs[index]

    def predict(self, sample: np.ndarray, t, cond: dict | None = None) -> np.ndarray:
        """Model output for a batch at training timestep t, from t's group engine and inputs
        (noise-corrected when the bundle has a correction and it is on). ``t``: one integer
        timestep, or one per row (rows in different groups run their groups' engines). ``cond``:
        the conditioning inputs of a conditional model (``bundle.conditioning`` lists them)."""
        check_sample(sample, self.sample_shape, finite=False)  # the engine checks the values
        cond = self.conditioning.check(cond, len(sample)) if (cond or self.conditioning) else None
        if np.ndim(t) == 0:
            return self._predict_group(sample, self.group_of(t), t, cond)
        ts = np.asarray(t)
        if ts.shape != (len(sample),):
            raise InputError(f"timesteps must be one integer or one per row ({len(sample)}), got shape {list(ts.shape)}")
        groups = [self.group_of(v) for v in ts.tolist()]
        out = np.empty((len(sample), *self.sample_shape), np.float32)
        for g in dict.fromkeys(groups):
            rows = np.array([i for i, h in enumerate(groups) if h == g])
            sub = {k: v[rows] for k, v in cond.items()} if cond else cond
            out[rows] = self._predict_group(sample[rows], g, ts[rows].astype(np.int64), sub)
        return out

    def _predict_group(self, sample: np.ndarray, g: Group, t, cond: dict | None) -> np.ndarray:
        with self._lock:
            if self._active != g.engine:
                # one engine's activation buffers resident at a time (OpenVINO frees them; the others
                # keep none of their own): a sampler uses each group's engine for consecutive steps
                if self._active is not None:
                    self._engines[self._active].release()
                self._active = g.engine
            extra = self._group_inputs(g.index)
        eps = self._engines[g.engine].predict(sample, t, extra, cond=cond)
        if self.corrections is not None:
            eps = self.corrections[g.index].apply(eps)
        return eps

    def decode(self, latents: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Images [B, 3, H, W] in [-1, 1] from sampled latents (latent bundles only)."""
        if self.decoder is None:
            raise InputError("this bundle has no decoder: its samples are images already")
        return self.decoder.decode(latents, batch_size)

    def residual_variance(self, t: int, ndim: int) -> np.ndarray | None:
        """Per-channel variance of the quantization residual left in eps at t (for the
        sampler's variance schedule calibration); None without a correction."""
        if self.corrections is None:
            return None
        return self.corrections[self.group_of(t).index].residual_var(ndim)


def _sampling(manifest: dict) -> SamplerChoice | None:
    """The sampler and steps a bundle was calibrated with (sampling runs default to them): the
    manifest's ``sampler``; DDIM at the calibration's steps for bundles from before it was
    recorded; None for fp32 exports (the model's scheduler class decides)."""
    entry = manifest.get("sampler")
    try:
        if entry is not None:
            return SamplerChoice(entry["name"], int(entry["steps"]), bool(entry.get("karras", False)))
    except InputError as e:
        raise BundleError(f"manifest sampler: {e}; {HINT}") from None
    steps = (manifest.get("calibration") or {}).get("steps")
    return SamplerChoice("ddim", int(steps)) if isinstance(steps, int) and steps >= 1 else None


def load_group_inputs(root: Path, name: str) -> dict[str, np.ndarray]:
    """A group's extra engine inputs from its .npz (no pickles allowed)."""
    try:
        with np.load(root / name, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise BundleError(f"cannot read group inputs {name}: {e}; the file is corrupt, rebuild the bundle") from e


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise BundleError(msg)


def validate_manifest(manifest: dict, root: Path, *, verify: bool = True) -> None:
    """Raise BundleError unless ``manifest`` describes a readable bundle rooted at ``root``: the
    schema of its version (:mod:`dmruntime.schema`), then what the schema cannot say (files on
    disk and their hashes, names that refer to listed files, groups that partition the timesteps)."""
    check_manifest(manifest)
    engine = manifest.get("engine") or {}
    runtime = engine_runtime(engine.get("runtime", "onnxruntime"))
    if manifest.get("engine") is not None:
        check_entry(runtime.schema, manifest["engine"], "engine")
    files = manifest["files"]
    root_abs = root.resolve()
    for name, info in files.items():
        p = (root / name).resolve()
        _require(is_relative_file(name) and p.is_relative_to(root_abs),
                 f"manifest lists {name!r}, a path outside the bundle; refusing to read it")
        _require(p.is_file(), f"bundle file {name} is missing; rebuild the bundle")
        if verify:
            _require(p.stat().st_size == info["bytes"],
                     f"bundle file {name} has {p.stat().st_size} bytes, manifest says {info['bytes']}: "
                     "truncated or replaced; rebuild the bundle")
            _require(sha256_file(p) == info["sha256"],
                     f"bundle file {name} does not match its sha256 in the manifest: corrupt or modified; "
                     "rebuild the bundle")
    runtime.check(manifest)
    check_components(manifest, files)
    for key in ("null", "class_table"):
        entry = (manifest.get("conditioning") or {}).get(key)
        if entry:
            _require(entry["file"] in files, f"the conditioning file {entry['file']!r} is not listed in 'files'")
    weights = manifest.get("weights")
    if weights is not None:
        _require(weights["file"] in files, f"manifest weights file {weights['file']!r} is not listed in 'files'")
    for name, info in (manifest.get("engines") or {}).items():
        _require(name in files, f"manifest engines lists {name!r}, which 'files' does not list")
        for init, key in (info.get("external_weights") or {}).items():
            _require(weights is not None and key in weights["tensors"],
                     f"engine {name} takes {init!r} from stored weight {key!r}, which the manifest does not list")
    for i, g in enumerate(manifest["groups"]):
        _require(g["index"] == i, f"manifest groups[{i}].index is {g['index']}; groups must be listed in order: rebuild the bundle")
        for key in ("engine", "inputs"):
            if g.get(key) is not None:
                _require(g[key] in files, f"group {i} names {key} {g[key]!r}, which the manifest's files do not list")
