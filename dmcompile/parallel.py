"""Where independent jobs run: here, one after another, or as Ray tasks on a cluster (``--ray``).

A pool maps a module-level function ``fn(shared, payload)`` over payloads; ``shared`` (a probe,
its inputs) goes to the workers once, through Ray's object store, and each worker process keeps
the last one it unpacked. Results come back tagged with their payload's index, in whatever
order tasks finish: callers place them by index, so what they assemble is the same whatever
the number of workers or the order. Ray is imported only when a pool over it is opened.

Faults: a task whose worker dies is run again by Ray (``RETRIES``); a worker whose dmcompile
differs from the driver's (version and source digest) refuses the task with ``ClusterError``.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import __version__, onnxio
from .errors import ClusterError, ConfigError, DmcompileError

LOCAL = "local"  # start a Ray cluster in this process (``--ray`` without an address)
SHIP_BYTES = 256 << 20  # a graph with at most this much weight data goes to workers through the object store
RETRIES = 3  # runs of a task whose worker died before it is given up
KILL_ONCE_ENV = "DMCOMPILE_TEST_KILL_ONCE"  # tests: the first task to see this file absent creates it and dies

_source = None
_shared: dict = {}  # worker side: the last shared object unpacked, by key


def identity() -> str:
    """This dmcompile: its version and a digest of its source files (workers must match it)."""
    global _source
    if _source is None:
        h = hashlib.sha256()
        root = Path(__file__).parent
        for p in sorted(root.rglob("*.py")):
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
        _source = h.hexdigest()[:12]
    return f"dmcompile {__version__} (source {_source})"


def default_threads() -> int:
    """The CPUs this process may run on: the thread count RD probes use on the driver and on
    every worker (ONNX Runtime's results with weights fed as inputs depend on it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def portable(model, base_dir, ship_bytes: int | None = None):
    """(model, base_dir) as workers should get them: the graph with its weights inside when they
    are at most ``ship_bytes`` (default SHIP_BYTES; through Ray's object store), else (None,
    base_dir): workers read the model file there, a path every node must see."""
    import onnx

    ship = SHIP_BYTES if ship_bytes is None else ship_bytes
    ext = onnxio.external_files(model)
    size = onnxio.data_bytes(model) + sum((Path(base_dir) / f).stat().st_size for f in ext)
    if size > ship:
        return None, base_dir
    if ext:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return onnxio.load_data(m, base_dir), None
    return model, None


def opened(model, source, base_dir):
    """(model, base_dir) on a worker: as shipped, or read from ``source`` (the model file) when
    it came without one; ClusterError when this node cannot see the file."""
    if model is not None:
        return model, base_dir
    path = Path(source)
    if not path.is_file():
        import socket

        raise ClusterError(f"the model file {path} is not visible on this node ({socket.gethostname()}): put the "
                           "dmcompile cache (DMCOMPILE_CACHE) on a filesystem every Ray node mounts at the same path")
    return onnxio.load(path, weights=False), path.parent


class SerialPool:
    """Every job in this process, in order."""

    workers = 1
    address = None

    def map(self, fn: Callable, shared, payloads: Iterable, cpus: int = 1) -> Iterator[tuple[int, object]]:
        for i, p in enumerate(payloads):
            yield i, fn(shared, p)

    def describe(self) -> dict:
        return {"workers": 1, "ray": None}


def _run(driver: str, key: str, box: list, fn: Callable, payload):
    """A Ray task: ``fn(shared, payload)`` on a worker (``box``: the shared object's reference,
    boxed so that Ray does not fetch it for every task)."""
    mine = identity()
    if mine != driver:
        raise ClusterError(f"this Ray worker runs {mine}, the driver {driver}: install the same dmcompile on every "
                           f"node (pip install the same commit) and restart the cluster")
    marker = os.environ.get(KILL_ONCE_ENV)
    if marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)  # a worker lost mid-task: Ray runs the task again
    if key not in _shared:
        import ray

        _shared.clear()
        _shared[key] = ray.get(box[0])
    return fn(_shared[key], payload)


class RayPool:
    """Jobs as Ray tasks. ``address``: ``"local"`` starts a cluster in this process (``workers``
    CPUs, default all), ``"auto"`` joins the one running on this node, else a cluster address
    (``host:port`` or ``ray://host:10001``)."""

    def __init__(self, address: str = LOCAL, workers: int | None = None):
        try:
            import ray
        except ImportError as e:
            raise ConfigError("--ray needs Ray on this machine and every node: pip install 'dmcompile[ray]' "
                              "(or pip install ray)") from e
        self.ray, self.address, self._started = ray, address, False
        if not ray.is_initialized():
            kw = {"include_dashboard": False, "log_to_driver": False, "logging_level": "error"}
            try:
                if address == LOCAL:
                    ray.init(num_cpus=workers, **kw)
                else:
                    ray.init(address=address, **kw)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise ClusterError(f"cannot join the Ray cluster at {address!r}: {e}; start it first (ray start "
                                   "--head on one node, ray start --address=HEAD:6379 on the others) or run "
                                   "--ray without an address for a local one") from e
            self._started = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(max_retries=RETRIES, num_cpus=1)(_run)

    def map(self, fn: Callable, shared, payloads: Iterable, cpus: int = 1) -> Iterator[tuple[int, object]]:
        """``cpus``: the threads each task runs; Ray reserves that many CPUs per task (at most a
        node's), so a node runs as many tasks at once as it has room for."""
        ray = self.ray
        per_node = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
        task = self._task.options(num_cpus=max(1, min(cpus, per_node)))
        box = [ray.put(shared)]
        key = box[0].hex()
        driver = identity()
        todo = iter(enumerate(payloads))
        pending: dict = {}
        window = 2 * self.workers  # payloads are made as tasks finish: bounded memory on the driver

        def submit() -> bool:
            try:
                i, p = next(todo)
            except StopIteration:
                return False
            pending[task.remote(driver, key, box, fn, p)] = i
            return True

        while len(pending) < window and submit():
            pass
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, DmcompileError):
                        raise cause from None
                    raise
                submit()
                yield i, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def describe(self) -> dict:
        return {"workers": self.workers, "ray": self.address}

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


@contextmanager
def pool(ray: str | None = None, workers: int | None = None):
    """A :class:`SerialPool` when ``ray`` is None, else a :class:`RayPool` over ``ray`` (closed
    on exit when it started the cluster)."""
    if ray is None:
        yield SerialPool()
        return
    p = RayPool(ray, workers)
    try:
        yield p
    finally:
        p.close()
