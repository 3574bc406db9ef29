"""Errors a user can see. Each message says what is wrong and what to do.

The CLI prints them without a traceback and exits with code 2.
"""


class DmcompileError(Exception):
    """Base class of every error dmcompile raises on purpose."""


class ModelError(DmcompileError):
    """The model argument names no known model, or its folder is missing or malformed."""


class ConfigError(DmcompileError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ExportError(DmcompileError):
    """Tracing to ONNX failed or the ONNX model disagrees with PyTorch."""


class BudgetError(DmcompileError, ValueError):
    """A bit budget cannot be parsed or no allocation meets it."""


class ArtifactError(DmcompileError):
    """A stored artefact (curves, calibration, layer map) is corrupt or was written by a
    dmcompile of another schema version."""


class ClusterError(DmcompileError):
    """A Ray cluster cannot be joined, or its workers run another dmcompile."""
