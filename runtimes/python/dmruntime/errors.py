"""Errors the runtime raises for bad bundles and bad inputs."""


class DmRuntimeError(Exception):
    """Base class of every error dmruntime raises on purpose."""


class BundleError(DmRuntimeError):
    """The bundle on disk is missing, corrupt, or not one this runtime can read."""


class InputError(DmRuntimeError, ValueError):
    """An argument (array shape, dtype, step count, ...) is not acceptable."""
