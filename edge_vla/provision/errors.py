"""Provisioning errors (all EdgeVlaError, so the CLI prints them as `edge-vla CMD: error: ...`)."""

from __future__ import annotations

from edge_vla.errors import EdgeVlaError


class PackageError(EdgeVlaError):
    """A robot package is missing, corrupt, or does not fit this machine."""


class InstallError(EdgeVlaError):
    """Staging or switching a release failed; the previous release is still current."""
