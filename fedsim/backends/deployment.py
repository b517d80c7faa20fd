"""The same ServerApp and ClientApp on Flower's deployment runtime (SuperLink, SuperNodes, gRPC).

With `superlink: null` the backend starts a federation on loopback: one SuperLink
and `num_clients` SuperNodes (node i holds partition i), TLS and SuperNode
authentication on unless asked otherwise. It submits the run with `flwr run`,
waits for it to end, and stops every process it started, by pid. With
`superlink: host:port` it submits to a SuperLink that is already running; the
SuperNodes are started on their own machines (README, "Deployment").
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.supercore.address import parse_address
from omegaconf import DictConfig, OmegaConf

from fedsim.backends.base import Backend
from fedsim.config import to_run_config
from fedsim.deployment.errors import DeploymentError
from fedsim.deployment.federation import LocalFederation
from fedsim.deployment.flwr_cli import RunResult, submit_run, write_connection
from fedsim.errors import ConfigError
from fedsim.run_dir import release

log = logging.getLogger("fedsim")
WORK_DIR = "deployment"  # inside the run's output_dir: certificates, keys, logs, FLWR_HOME


def check_deployment_settings(superlink: str | None, root_certificates: str | None,
                              insecure: bool, node_auth: bool, timeout_s: float) -> None:
    """Raise a `ConfigError` naming the first backend field that is not allowed.

    Runs where the run is submitted (the CLI's preflight), never on the SuperLink's
    machine: the ServerApp receives the backend without these local paths.
    """
    if superlink is not None and (not isinstance(superlink, str) or parse_address(superlink)
                                  is None):
        raise ConfigError(
            "backend.superlink must be null (start a local federation) or the Control API "
            f"address host:port of a running SuperLink (got {superlink!r})"
        )
    if root_certificates is not None:
        if superlink is None:
            raise ConfigError("backend.root_certificates is for backend.superlink; a local "
                              "federation makes its own certificates (set it to null)")
        if insecure:
            raise ConfigError("backend.root_certificates and backend.insecure=true exclude each "
                              "other: pick TLS with that CA, or no TLS")
        if not Path(root_certificates).expanduser().is_file():
            raise ConfigError(f"backend.root_certificates: no such file '{root_certificates}'")
    for name, value in (("insecure", insecure), ("node_auth", node_auth)):
        if not isinstance(value, bool):
            raise ConfigError(f"backend.{name} must be true or false (got {value!r})")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
        raise ConfigError(f"backend.timeout_s must be a number of seconds > 0 (got {timeout_s!r})")


def deployed_config(cfg: DictConfig, local: bool) -> DictConfig:
    """The config the apps receive: no submitter-side paths in `backend`, and for a local
    federation an absolute `output_dir` (the ServerApp runs in another process)."""
    deployed = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    deployed.backend = {"_target_": cfg.backend._target_, "superlink": cfg.backend.superlink}
    if local:
        deployed.output_dir = str(Path(cfg.output_dir).resolve())
    return deployed


class DeploymentBackend(Backend):
    """Runs the fedsim apps through `flwr run` on a SuperLink: local (loopback) or remote.

    Parameters
    ----------
    superlink : Control API address (host:port) of a running SuperLink; None starts a
        local federation with `num_clients` SuperNodes.
    root_certificates : CA certificate (PEM) that signed that SuperLink's TLS certificate;
        None uses the system's trusted CAs.
    insecure : plain gRPC without TLS, only when asked.
    node_auth : local federation only: register each SuperNode's key and refuse others.
    timeout_s : longest the run may take once submitted; then it is stopped.
    """

    #: the server's state resumes; a SuperNode's own state (a stateful trainer's) is its
    #: process's, and a resumed run, a new Flower run, starts it afresh
    resumable = True

    def __init__(self, superlink: str | None = None, root_certificates: str | None = None,
                 insecure: bool = False, node_auth: bool = True,
                 timeout_s: float = 3600.0) -> None:
        check_deployment_settings(superlink, root_certificates, insecure, node_auth, timeout_s)
        self.superlink = superlink
        self.root_certificates = root_certificates
        self.insecure = insecure
        self.node_auth = node_auth
        self.timeout_s = float(timeout_s)

    @property
    def outputs_elsewhere(self) -> bool:
        """A remote SuperLink's ServerApp writes the run's outputs on that machine."""
        return self.superlink is not None

    def run(self, cfg: DictConfig) -> None:
        """Submit the run (starting a local federation first when no SuperLink is given).

        The run directory's claim passes to the ServerApp, which claims it in its own process.
        """
        release(Path(cfg.output_dir))
        work_dir = (Path(cfg.output_dir) / WORK_DIR).resolve()
        run_config = to_run_config(deployed_config(cfg, local=self.superlink is None))
        if self.superlink is None:
            with LocalFederation(work_dir, cfg.num_clients, tls=not self.insecure,
                                 node_auth=self.node_auth) as federation:
                log.info("local federation: SuperLink %s, %d SuperNodes (TLS %s, node auth %s)",
                         federation.fleet_address, cfg.num_clients,
                         "off" if self.insecure else "on", "on" if self.node_auth else "off")
                result = submit_run(run_config, federation.flwr_home, work_dir, self.timeout_s)
        else:
            flwr_home = work_dir / "flwr-home"
            certificates = self.root_certificates
            write_connection(flwr_home, self.superlink,
                             Path(certificates).expanduser() if certificates else None,
                             self.insecure)
            result = submit_run(run_config, flwr_home, work_dir, self.timeout_s)
        _check_completed(result, work_dir)


def _check_completed(result: RunResult, work_dir: Path) -> None:
    """Raise unless the SuperLink reports the run as completed."""
    if result.status != "finished:completed":
        raise DeploymentError(f"run {result.run_id} ended as '{result.status}'; the ServerApp's "
                              f"log is in {work_dir / 'run.log'}")
