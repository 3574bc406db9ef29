"""Deprecated location of the target profiles: they live in :mod:`dmcompile.targets`."""

from ..targets import ORT_CPU, PROFILES, TargetProfile  # noqa: F401
