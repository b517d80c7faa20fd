"""Flower's deployment runtime driven from fedsim: TLS files, SuperNode keys, a local
federation on loopback, and run submission with `flwr run`.

Everything here starts Flower's own executables (`flower-superlink`,
`flower-supernode`, `flwr`) as subprocesses; fedsim adds no transport of its own.
Stopping a started process by pid also stops every process below it (the
SuperExec, which Flower starts in a session of its own, and the app processes).
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsim.errors import FedsimError
from fedsim.recording import set_aside

APP_DIR = Path(__file__).resolve().parent.parent  # pyproject.toml with [tool.flwr.app]
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
CONNECTION = "fedsim"  # the SuperLink connection fedsim writes into its FLWR_HOME
STOP_GRACE_S = 10.0
REFUSED = "Failed to activate SuperNode"  # what a SuperNode logs when the SuperLink refuses it
STOPPED_MARK = "# stopped"  # last line of the pids file once every process is gone


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
    """PKCS#8 PEM, unencrypted: the form `flower-superlink --ssl-keyfile` reads."""
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
    if pair.public.exists():
        raise DeploymentError(f"{pair.public} exists; fedsim never overwrites a key")
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
    """Create a new file readable by its owner only; never follow a link or reuse a file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as err:
        raise DeploymentError(f"{path} exists; fedsim never overwrites a key") from err
    with os.fdopen(fd, "wb") as file:
        file.write(data)


# --------------------------------------------------------------------------- flwr CLI


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None,
                     insecure: bool) -> None:
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
    return {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": path, "NO_COLOR": "1",
            "TERM": "dumb"}


def flwr_cli(args: Sequence[str], flwr_home: Path, timeout: float = 120.0,
             log_file: Path | None = None) -> str:
    """Run `flwr <args>` against `flwr_home`; return its stdout or raise naming the step."""
    try:
        done = subprocess.run([_executable("flwr"), *args], env=flower_environment(flwr_home),
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise DeploymentError(f"`flwr {args[0]}` did not finish within {timeout:.0f} s") from err
    output = done.stdout + done.stderr
    if log_file is not None:
        with log_file.open("a") as log:
            log.write(f"$ flwr {' '.join(args)}\n{output}\n")
    if done.returncode != 0:
        raise DeploymentError(f"`flwr {' '.join(args)}` failed (exit {done.returncode}): "
                              f"{_tail(output)}")
    return done.stdout


def flwr_json(args: Sequence[str], flwr_home: Path, log_file: Path | None = None) -> dict:
    """`flwr <args> --format json`: its JSON answer, or the error Flower reports in it.

    With `--format json`, `flwr` exits 0 on failure too and says so in the JSON.
    """
    output = flwr_cli([*args, "--format", "json"], flwr_home, log_file=log_file)
    try:
        answer = json.loads(output[output.index("{"):])
    except ValueError as err:  # no "{" at all, or not JSON after it
        raise DeploymentError(f"`flwr {args[0]}` printed no JSON: {_tail(output)}") from err
    if not answer.get("success", False):
        raise DeploymentError(f"`flwr {' '.join(args)}` failed: "
                              f"{answer.get('error-message', _tail(output))}")
    return answer


def _tail(text: str, lines: int = 8) -> str:
    """The last lines of a process's output, on one line (for error messages)."""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


@dataclass(frozen=True)
class RunResult:
    """What the SuperLink says of a finished run."""

    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed"


def submit_run(run_config: Mapping[str, str], flwr_home: Path, work_dir: Path, timeout: float,
               app_dir: Path = APP_DIR) -> RunResult:
    """Submit the fedsim app with `run_config` to the default connection; wait until it ends.

    The ServerApp's log streams into `work_dir/run.log`. A run still going after
    `timeout` seconds is stopped on the SuperLink before the error is raised.
    """
    if not (app_dir / "pyproject.toml").is_file():
        raise DeploymentError(f"{app_dir} has no pyproject.toml: deploy from a fedsim checkout "
                              "(pip install -e .)")
    work_dir.mkdir(parents=True, exist_ok=True)
    overrides = work_dir / "run_config.toml"
    overrides.write_text(tomli_w.dumps(dict(run_config)))
    log_file = work_dir / "run.log"
    started = flwr_json(["run", str(app_dir), CONNECTION, "--run-config", str(overrides)],
                        flwr_home, log_file=log_file)
    run_id = int(started["run-id"])
    try:
        flwr_cli(["log", str(run_id), CONNECTION, "--stream"], flwr_home, timeout=timeout,
                 log_file=log_file)
    except DeploymentError:
        with contextlib.suppress(DeploymentError):
            flwr_cli(["stop", str(run_id), CONNECTION], flwr_home, log_file=log_file)
        raise
    return RunResult(run_id, run_status(run_id, flwr_home))


def run_status(run_id: int, flwr_home: Path) -> str:
    """The SuperLink's status string for `run_id`."""
    runs = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], flwr_home).get("runs", [])
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

    Node i gets `--node-config "partition-id=i num-partitions=num_nodes"`. With
    `node_auth`, each node's key is made and registered before it starts;
    `unregistered_nodes` extra nodes start with keys the SuperLink never saw (they
    must be refused). Processes run in the caller's working directory, so relative
    paths in the run config mean what they meant to the caller.
    """

    directory: Path
    num_nodes: int
    tls: bool = True
    node_auth: bool = True
    unregistered_nodes: int = 0
    node_timeout_s: float = 120.0  # how long SuperNodes may take to come online
    started: list[Started] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self.flwr_home = self.directory / "flwr-home"
        self.pids_file = self.directory / "pids"
        fleet, control, runtime = free_ports(3)
        self.fleet_address = f"127.0.0.1:{fleet}"
        self.control_address = f"127.0.0.1:{control}"
        self._runtime_port = runtime
        self.tls_files: TlsFiles | None = None
        self._guard = TerminationGuard()

    def __enter__(self) -> LocalFederation:
        self._guard.install()
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            with self._guard.deferred():
                self.stop()
        finally:
            self._guard.restore()

    def start(self) -> None:
        """SuperLink first, then registered nodes, then any unregistered ones.

        What an earlier, failed start left in `directory` is set aside as
        `<directory>.failed<n>` (keys are never overwritten, logs never lost).
        """
        if self.directory.exists() and any(self.directory.iterdir()):
            set_aside(self.directory, "failed")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.tls_files = make_tls_files(self.directory / "certificates")
        write_connection(self.flwr_home, self.control_address,
                         self.tls_files.ca_cert if self.tls_files else None, not self.tls)
        self._start_superlink()
        node_ports = free_ports(self.num_nodes + self.unregistered_nodes)
        for i in range(self.num_nodes):
            key = make_node_key(self.directory / "node-keys", f"node-{i}") \
                if self.node_auth else None
            if key is not None:
                flwr_json(["supernode", "register", str(key.public), CONNECTION],
                          self.flwr_home, log_file=self.directory / "register.log")
            self._start_supernode(f"supernode-{i}", node_ports[i], i, key)
        for j in range(self.unregistered_nodes):
            key = make_node_key(self.directory / "node-keys", f"unregistered-{j}")
            self._start_supernode(f"unregistered-{j}", node_ports[self.num_nodes + j], 0, key)
        self._wait_for_nodes()

    def _wait_for_nodes(self) -> None:
        """Return once `num_nodes` SuperNodes are online; raise naming the cause otherwise
        (the ServerApp would wait for missing nodes without end)."""
        nodes = [s for s in self.started if s.name.startswith("supernode-")]
        timeout = self.node_timeout_s
        deadline, online = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            for node in nodes:
                if node.process.poll() is not None:
                    raise DeploymentError(f"{node.name} exited with {node.process.returncode}: "
                                          f"{_tail(node.log.read_text())}")
                if REFUSED in node.log.read_text():  # the process lingers after a refusal
                    raise DeploymentError(f"the SuperLink refused {node.name} ('{REFUSED}'); "
                                          f"is its key registered? Log: {node.log}")
            listed = flwr_json(["supernode", "ls", CONNECTION], self.flwr_home).get("nodes", [])
            online = sum(node.get("status") == "online" for node in listed)
            if online >= self.num_nodes:
                return
            time.sleep(0.5)
        raise DeploymentError(f"{online} of {self.num_nodes} SuperNodes came online within "
                              f"{timeout:.0f} s; their logs are in {self.directory / 'logs'}")

    def _security_args(self, server: bool) -> list[str]:
        """TLS flags for the SuperLink (`server`) or a SuperNode; `--insecure` without TLS."""
        if not self.tls:
            return ["--insecure"]
        files = self.tls_files
        if server:
            return ["--ssl-ca-certfile", str(files.ca_cert), "--ssl-certfile",
                    str(files.server_cert), "--ssl-keyfile", str(files.server_key)]
        return ["--root-certificates", str(files.ca_cert)]

    def _start_superlink(self) -> None:
        """Start the SuperLink and wait until its Fleet and Control APIs accept connections."""
        args = [_executable("flower-superlink"), *self._security_args(server=True),
                "--fleet-api-address", self.fleet_address,
                "--control-api-address", self.control_address,
                "--port", str(self._runtime_port),
                "--disable-runtime-dependency-installation"]  # the app's deps are installed here
        if self.node_auth:
            args.append("--enable-supernode-auth")
        superlink = self._spawn("superlink", args)
        for address in (self.fleet_address, self.control_address):
            _wait_for_port(address, superlink)

    def _start_supernode(self, name: str, runtime_port: int, partition_id: int,
                         key: NodeKey | None) -> None:
        """Start a SuperNode holding `partition_id`, authenticated with `key` when given."""
        args = [_executable("flower-supernode"), *self._security_args(server=False),
                "--superlink", self.fleet_address, "--port", str(runtime_port),
                "--node-config", f"partition-id={partition_id} num-partitions={self.num_nodes}"]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key.private)]
        self._spawn(name, args)

    def _spawn(self, name: str, args: list[str]) -> Started:
        """Start a process logging to `logs/<name>.log` and record its pid at once.

        Signals are held, not blocked, meanwhile: a blocked mask would be inherited
        and the process could not be stopped gracefully.
        """
        log = self.directory / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with self._guard.deferred(), log.open("w") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                       env=flower_environment(self.flwr_home),
                                       start_new_session=True)
            started = Started(name, process, log)
            self.started.append(started)
            with self.pids_file.open("a") as pids:
                pids.write(f"{process.pid} {name}\n")
        return started

    def stop(self) -> None:
        """Stop every started process and everything below it: SIGTERM, then SIGKILL.

        The processes are looked up again before the SIGKILL pass (an app process may
        have started meanwhile), by ancestry and by this federation's `FLWR_HOME`.
        """
        for sig_name in ("terminate", "kill"):
            members = self._members()
            for proc in members:
                with contextlib.suppress(psutil.NoSuchProcess):
                    getattr(proc, sig_name)()
            if not _still_running(members, timeout=STOP_GRACE_S):
                break
        for started in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                started.process.wait(timeout=STOP_GRACE_S)  # reap our own children
        if self.started:
            with self.pids_file.open("a") as pids:
                pids.write(f"{STOPPED_MARK}\n")
        self.started.clear()

    def _members(self) -> list[psutil.Process]:
        """Running processes of this federation: the started ones not yet reaped (a reaped
        pid may belong to another process by now), their descendants, and any process
        whose environment names this `FLWR_HOME`."""
        members = {proc.pid: proc for started in self.started
                   if started.process.poll() is None for proc in _with_descendants(started)}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.pid not in members and \
                        proc.environ().get("FLWR_HOME") == str(self.flwr_home):
                    members[proc.pid] = proc
        return [proc for proc in members.values() if _is_running(proc)]


def _wait_for_port(address: str, started: Started, timeout: float = 60.0) -> None:
    """Return once `address` accepts TCP connections; raise if the process dies first."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            raise DeploymentError(f"{started.name} exited with {started.process.returncode}: "
                                  f"{_tail(started.log.read_text())}")
        with socket.socket() as sock:
            if sock.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"{started.name} did not open {address} within {timeout:.0f} s")


def _with_descendants(started: Started) -> list[psutil.Process]:
    """The started process and all processes below it, whatever session they moved to."""
    try:
        root = psutil.Process(started.process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _still_running(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` s for `procs` to end; return those still running.

    A zombie counts as ended: it runs nothing, and where no init reaps orphans (some
    containers) it would otherwise be waited on for the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        running = [proc for proc in procs if _is_running(proc)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.05)


def _is_running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (`is_running` also guards against a reused pid)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


TERMINATION_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TerminationGuard:
    """Turns Ctrl-C, SIGTERM and SIGHUP into an exception, except inside `deferred()`.

    A signal that arrives while processes are being started or stopped is held and
    raised when that section ends, so a started process is always recorded and a
    stop always completes. Handlers can only be set in the main thread; elsewhere
    the guard does nothing and the caller must stop the federation itself.
    """

    def __init__(self) -> None:
        self._saved: dict[int, object] = {}
        self._deferring = 0
        self._pending: int | None = None

    def install(self) -> None:
        """Take over the signals (main thread only), remembering the handlers replaced."""
        if threading.current_thread() is threading.main_thread():
            self._saved = {sig: signal.signal(sig, self._handle) for sig in TERMINATION_SIGNALS}

    def restore(self) -> None:
        """Give the signals back to the handlers they had before `install`."""
        for sig, handler in self._saved.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._saved = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self._deferring:
            self._pending = signum
        else:
            _raise_for(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold the signals until the block ends, then raise the last one that came."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            pending, self._pending = self._pending, None
            if pending is not None and not self._deferring:
                _raise_for(pending)


def _raise_for(signum: int) -> None:
    """KeyboardInterrupt for Ctrl-C (as Python does), SystemExit(128 + n) otherwise."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    sys.exit(128 + signum)


