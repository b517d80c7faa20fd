"""The errors every step of a Flower deployment raises."""

from __future__ import annotations

from fedsim.errors import FedsimError, RunFailedError


class DeploymentError(FedsimError):
    """A Flower deployment process failed to start, refused a step, or a run failed."""


class SuperLinkLostError(DeploymentError, RunFailedError):
    """The SuperLink went away (stopped, crashed or restarted) while a run was going on.

    A `RunFailedError` too: the run's last checkpoint is where `fedsim resume` goes on.
    """
