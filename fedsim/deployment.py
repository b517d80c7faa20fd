"""Flower's deployment runtime driven from fedsim: TLS files, SuperNode keys, a local
federation on loopback, and run submission with `flwr run`.

Everything here starts Flower's own executables (`flower-superlink`,
`flower-supernode`, `flwr`) as subprocesses; fedsim adds no transport of its own.
Each started process leads its own process group, so stopping it by pid also
stops the SuperExec and app processes it spawned.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsim.errors import FedsimError

APP_DIR = Path(__file__).resolve().parent.parent  # pyproject.toml with [tool.flwr.app]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
CONNECTION = "fedsim"  # the SuperLink connection fedsim writes into its FLWR_HOME
STOP_GRACE_S = 10.0


class DeploymentError(FedsimError):
    """A Flower deployment process failed to start, refused a step, or a run failed."""


# --------------------------------------------------------------------------- TLS and keys


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate and the server certificate and key it signed (PEM files)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """IP addresses as IP entries, anything else as a DNS name."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls_files(
    directory: Path, hosts: Sequence[str] = LOOPBACK_HOSTS, days: int = 365
) -> TlsFiles:
    """A self-signed CA and a server certificate for `hosts` (names or IPs), for local use.

    SuperNodes and `flwr` trust `ca.crt`; the SuperLink serves `server.pem` with
    `server.key`. Every address clients dial must be among `hosts`.
    """
    if not hosts:
        raise DeploymentError("hosts: give at least one name or IP address for the certificate")
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(files.server_key, _private_key_pem(server_key))
    return files


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's key pair: the private key stays on the node, the public one is registered."""

    private: Path
    public: Path


def make_node_key(directory: Path, name: str) -> NodeKey:
    """An EC (SECP384R1) key pair in OpenSSH format, the form SuperNode authentication reads."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pair = NodeKey(directory / name, directory / f"{name}.pub")
    _write_secret(
        pair.private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pair.public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return pair


def _write_secret(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


# --------------------------------------------------------------------------- flwr CLI


def write_connection(
    flwr_home: Path, address: str, root_certificates: Path | None, insecure: bool
) -> None:
    """`FLWR_HOME/config.toml` naming one SuperLink connection (the default) for `flwr`."""
    connection: dict[str, object] = {"address": address}
    if insecure:
        connection["insecure"] = True
    elif root_certificates is not None:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))


def _executable(name: str) -> str:
    """A Flower executable from this interpreter's environment (then from PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise DeploymentError(f"'{name}' not found: install flwr (pip install 'flwr==1.36.*')")
    return found


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower's processes: this `FLWR_HOME`, and this interpreter's
    scripts first on PATH (the SuperLink and SuperNodes spawn `flower-superexec`,
    `flwr-serverapp` and `flwr-clientapp` by name)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "PATH": path,
        "NO_COLOR": "1",
        "TERM": "dumb",
    }


def flwr_cli(
    args: Sequence[str], flwr_home: Path, timeout: float = 120.0, log_file: Path | None = None
) -> str:
    """Run `flwr <args>` against `flwr_home`; return its output or raise naming the step."""
    try:
        done = subprocess.run(
            [_executable("flwr"), *args],
            env=flower_environment(flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise DeploymentError(f"`flwr {args[0]}` did not finish within {timeout:.0f} s") from err
    output = done.stdout + done.stderr
    if log_file is not None:
        with log_file.open("a") as log:
            log.write(f"$ flwr {' '.join(args)}\n{output}\n")
    if done.returncode != 0:
        raise DeploymentError(
            f"`flwr {' '.join(args)}` failed (exit {done.returncode}): {_tail(output)}"
        )
    return done.stdout


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _json_from(output: str) -> dict:
    """The JSON object `flwr ... --format json` prints after any other text."""
    start = output.find("{")
    if start < 0:
        raise DeploymentError(f"flwr printed no JSON: {_tail(output)}")
    return json.loads(output[start:])


@dataclass(frozen=True)
class RunResult:
    """What the SuperLink says of a finished run."""

    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed"


def submit_run(
    run_config: Mapping[str, str],
    flwr_home: Path,
    work_dir: Path,
    timeout: float,
    app_dir: Path = APP_DIR,
) -> RunResult:
    """Submit the fedsim app with `run_config` to the default connection; wait until it ends.

    The logs of the ServerApp are streamed into `work_dir/run.log`.
    """
    if not (app_dir / "pyproject.toml").is_file():
        raise DeploymentError(
            f"{app_dir} has no pyproject.toml: deploy from a fedsim checkout (pip install -e .)"
        )
    overrides = work_dir / "run_config.toml"
    overrides.write_text(tomli_w.dumps(dict(run_config)))
    log_file = work_dir / "run.log"
    started = _json_from(
        flwr_cli(
            ["run", str(app_dir), CONNECTION, "--run-config", str(overrides), "--format", "json"],
            flwr_home,
            log_file=log_file,
        )
    )
    run_id = int(started["run-id"])
    flwr_cli(
        ["log", str(run_id), CONNECTION, "--stream"], flwr_home, timeout=timeout, log_file=log_file
    )
    return RunResult(run_id, run_status(run_id, flwr_home))


def run_status(run_id: int, flwr_home: Path) -> str:
    """The SuperLink's status string for `run_id`."""
    listed = _json_from(
        flwr_cli(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], flwr_home)
    )
    runs = listed.get("runs", [])
    if not runs:
        raise DeploymentError(f"the SuperLink does not list run {run_id}")
    return str(runs[0].get("status"))


# --------------------------------------------------------------------------- processes


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free on loopback right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Started:
    """A process fedsim started, with its log file."""

    name: str
    process: subprocess.Popen
    log: Path


@dataclass
class LocalFederation:
    """A SuperLink and `num_nodes` SuperNodes on loopback, stopped by pid on exit.

    Node i gets `--node-config "partition-id=i num-partitions=num_nodes"` (plus
    `node_config[i]` when given). With `node_auth`, each node's key is made and
    registered before it starts; `unregistered_nodes` extra nodes start with
    keys the SuperLink never saw (they must be refused).
    """

    directory: Path
    num_nodes: int
    tls: bool = True
    node_auth: bool = True
    unregistered_nodes: int = 0
    node_config: Sequence[str] = ()
    started: list[Started] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()  # processes run inside it
        self.flwr_home = self.directory / "flwr-home"
        fleet, control, runtime = free_ports(3)
        self.fleet_address = f"127.0.0.1:{fleet}"
        self.control_address = f"127.0.0.1:{control}"
        self._runtime_port = runtime
        self.tls_files: TlsFiles | None = None
        self._previous_sigterm: signal.Handlers | None = None

    def __enter__(self) -> LocalFederation:
        self._previous_sigterm = _exit_on_sigterm()
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)

    def start(self) -> None:
        """SuperLink first, then registered nodes, then any unregistered ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.tls_files = make_tls_files(self.directory / "certificates")
        write_connection(
            self.flwr_home,
            self.control_address,
            self.tls_files.ca_cert if self.tls_files else None,
            not self.tls,
        )
        self._start_superlink()
        node_ports = free_ports(self.num_nodes + self.unregistered_nodes)
        for i in range(self.num_nodes):
            key = None
            if self.node_auth:
                key = make_node_key(self.directory / "node-keys", f"node-{i}")
                flwr_cli(
                    ["supernode", "register", str(key.public), CONNECTION],
                    self.flwr_home,
                    log_file=self.directory / "register.log",
                )
            config = f"partition-id={i} num-partitions={self.num_nodes}"
            if i < len(self.node_config) and self.node_config[i]:
                config += f" {self.node_config[i]}"
            self._start_supernode(f"supernode-{i}", node_ports[i], config, key)
        for j in range(self.unregistered_nodes):
            key = make_node_key(self.directory / "node-keys", f"unregistered-{j}")
            self._start_supernode(
                f"unregistered-{j}",
                node_ports[self.num_nodes + j],
                f"partition-id=0 num-partitions={self.num_nodes}",
                key,
            )

    def _security_args(self, server: bool) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        files = self.tls_files
        if server:
            return [
                "--ssl-ca-certfile",
                str(files.ca_cert),
                "--ssl-certfile",
                str(files.server_cert),
                "--ssl-keyfile",
                str(files.server_key),
            ]
        return ["--root-certificates", str(files.ca_cert)]

    def _start_superlink(self) -> None:
        args = [
            _executable("flower-superlink"),
            *self._security_args(server=True),
            "--fleet-api-address",
            self.fleet_address,
            "--control-api-address",
            self.control_address,
            "--port",
            str(self._runtime_port),
            "--disable-runtime-dependency-installation",
        ]  # the app's deps are installed here
        if self.node_auth:
            args.append("--enable-supernode-auth")
        self._spawn("superlink", args)
        for address in (self.fleet_address, self.control_address):
            self._wait_for_port(address, self.started[-1])

    def _start_supernode(
        self, name: str, runtime_port: int, node_config: str, key: NodeKey | None
    ) -> None:
        args = [
            _executable("flower-supernode"),
            *self._security_args(server=False),
            "--superlink",
            self.fleet_address,
            "--port",
            str(runtime_port),
            "--node-config",
            node_config,
        ]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key.private)]
        self._spawn(name, args)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.directory / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            process = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=flower_environment(self.flwr_home),
                cwd=self.directory,
                start_new_session=True,
            )
        self.started.append(Started(name, process, log))
        with (self.directory / "pids").open("a") as pids:
            pids.write(f"{process.pid} {name}\n")

    @staticmethod
    def _wait_for_port(address: str, started: Started, timeout: float = 60.0) -> None:
        host, port = address.rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if started.process.poll() is not None:
                raise DeploymentError(
                    f"{started.name} exited with {started.process.returncode}:"
                    f" {_tail(started.log.read_text())}"
                )
            with socket.socket() as sock:
                if sock.connect_ex((host, int(port))) == 0:
                    return
            time.sleep(0.2)
        raise DeploymentError(f"{started.name} did not open {address} within {timeout:.0f} s")

    def exited(self, name: str) -> int | None:
        """The exit code of the process called `name`, or None while it runs."""
        return next(s.process.poll() for s in self.started if s.name == name)

    def stop(self) -> None:
        """SIGTERM each started process group by pid, then SIGKILL what is left."""
        for started in reversed(self.started):
            _signal_group(started.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for started in reversed(self.started):
            with contextlib.suppress(subprocess.TimeoutExpired):
                started.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            _signal_group(started.process, signal.SIGKILL)  # children that ignored SIGTERM
            started.process.wait()
            _wait_until_group_is_gone(started.process.pid)
        self.started.clear()


def _exit_on_sigterm() -> signal.Handlers | None:
    """Make SIGTERM raise SystemExit (so `stop` runs); return the handler it replaced.

    Only the main thread may set handlers; elsewhere SIGTERM keeps its meaning.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _wait_until_group_is_gone(pgid: int, timeout: float = 5.0) -> None:
    """Return once no process of group `pgid` is left (killed children are reaped by init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
