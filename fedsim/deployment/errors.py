"""The error every step of a Flower deployment raises."""

from __future__ import annotations

from fedsim.errors import FedsimError


class DeploymentError(FedsimError):
    """A Flower deployment process failed to start, refused a step, or a run failed."""
