"""A local federation on loopback: a SuperLink and SuperNodes started as Flower's own
executables, waited for until online, and stopped by pid (recorded in a pids file).

Stopping a started process by pid also stops every process below it (the
SuperExec, which Flower starts in a session of its own, and the app processes).
Any one of them can also be killed and restarted with the same arguments (`kill`,
`restart`): the faults a real federation meets, on loopback.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedsim.deployment.certificates import NodeKey, TlsFiles, make_node_key, make_tls_files
from fedsim.deployment.errors import DeploymentError
from fedsim.deployment.flwr_cli import (
    CONNECTION,
    _executable,
    _tail,
    flower_environment,
    flwr_json,
    write_connection,
)
from fedsim.deployment.signals import TerminationGuard
from fedsim.recording import set_aside

STOP_GRACE_S = 10.0
REFUSED = "Failed to activate SuperNode"  # what a SuperNode logs when the SuperLink refuses it
NODE_ID = re.compile(r"SuperNode ID: (\d+)")  # what a SuperNode logs once the SuperLink took it
RESTARTED_MARK = "--- restarted by fedsim ---"  # a restarted process's log goes on after it
RESTART_RETRY_S = 5.0  # between starts of a SuperNode the SuperLink still counts as online
STOPPED_MARK = "# stopped"  # last line of the pids file once every process is gone


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
    args: list[str] = field(default_factory=list)  # what `restart` starts again


@dataclass
class LocalFederation:
    """A SuperLink and `num_nodes` SuperNodes on loopback, stopped by pid on exit.

    Node i gets `--node-config "partition-id=i num-partitions=num_nodes"`. With
    `node_auth`, each node's key is made and registered before it starts;
    `unregistered_nodes` extra nodes start with keys the SuperLink never saw (they
    must be refused). Processes run in the caller's working directory, so relative
    paths in the run config mean what they meant to the caller. With `state_db`, the
    SuperLink keeps its state (registered nodes, runs) in `superlink.db` instead of in
    memory, so its SuperNodes reconnect when it is restarted; without, a restarted
    SuperLink knows no node, and its SuperNodes never come back online.
    """

    directory: Path
    num_nodes: int
    tls: bool = True
    node_auth: bool = True
    unregistered_nodes: int = 0
    node_timeout_s: float = 120.0  # how long SuperNodes may take to come online
    state_db: bool = False
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
            online = len(self.online_nodes())
            if online >= self.num_nodes:
                return
            time.sleep(0.5)
        raise DeploymentError(f"{online} of {self.num_nodes} SuperNodes came online within "
                              f"{timeout:.0f} s; their logs are in {self.directory / 'logs'}")

    def online_nodes(self) -> list[int]:
        """Ids of the SuperNodes the SuperLink lists as online."""
        listed = flwr_json(["supernode", "ls", CONNECTION], self.flwr_home).get("nodes", [])
        return [int(node["node-id"]) for node in listed if node.get("status") == "online"]

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
        if self.state_db:
            args += ["--database", str(self.directory / "superlink.db")]
        self._wait_for_superlink(self._spawn("superlink", args))

    def _wait_for_superlink(self, superlink: Started) -> None:
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

    def _spawn(self, name: str, args: list[str], mode: str = "w") -> Started:
        """Start a process logging to `logs/<name>.log` and record its pid at once
        (`mode="a"`: its log goes on after what an earlier process of that name wrote).

        Signals are held, not blocked, meanwhile: a blocked mask would be inherited
        and the process could not be stopped gracefully.
        """
        log = self.directory / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with self._guard.deferred(), log.open(mode) as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                       env=flower_environment(self.flwr_home),
                                       start_new_session=True)
            started = Started(name, process, log, list(args))
            self.started.append(started)
            with self.pids_file.open("a") as pids:
                pids.write(f"{process.pid} {name}\n")
        return started

    # ---- faults: one process killed, then started again ----------------------------

    def process(self, name: str) -> Started:
        """The started process named `name` ("superlink", "supernode-<i>")."""
        for started in self.started:
            if started.name == name:
                return started
        raise KeyError(f"no started process named {name!r} "
                       f"(started: {[s.name for s in self.started]})")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` (SIGKILL: a crash, a machine lost) to the process `name` and to every
        process below it, by pid; return once they are gone, with their pids.

        Flower starts a SuperLink's or SuperNode's SuperExec in a session of its own, so
        it is found by ancestry before the signal, not by process group.
        """
        started = self.process(name)
        with self._guard.deferred():
            members = [proc for proc in _with_descendants(started) if _is_running(proc)]
            for proc in members:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(sig)
            left = _still_running(members, timeout=STOP_GRACE_S)
            for proc in left:  # a SIGTERM not obeyed in time
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            _still_running(left, timeout=STOP_GRACE_S)
            with contextlib.suppress(subprocess.TimeoutExpired):
                started.process.wait(timeout=STOP_GRACE_S)
        return [proc.pid for proc in members]

    def restart(self, name: str) -> Started:
        """Start the process `name` again with the arguments it had (its log goes on), and
        return once it serves again: the SuperLink's ports open, a SuperNode online.

        A process still running is killed first. The SuperLink refuses a SuperNode whose
        previous process it still counts as online (until that one misses its heartbeats,
        up to 60 s); such a node is started again every `RESTART_RETRY_S` seconds until
        it is taken, or `node_timeout_s` has passed. Without `state_db`, a restarted
        SuperLink has lost every node and run (the SuperNodes do not come back by
        themselves).
        """
        if self.process(name).process.poll() is None:
            self.kill(name)
        deadline = time.monotonic() + self.node_timeout_s
        while True:
            started, log_start = self._respawn(name)
            if name == "superlink":
                self._wait_for_superlink(started)
                return started
            if not name.startswith("supernode-") or \
                    self._wait_for_node_back(started, log_start, deadline):
                return started
            self.kill(name)  # refused: it lingers after a refusal
            time.sleep(RESTART_RETRY_S)

    def _respawn(self, name: str) -> tuple[Started, int]:
        """Start `name` again as it was started; return it and where its new log begins."""
        old = self.process(name)
        self.started.remove(old)
        with old.log.open("a") as log:
            log.write(f"\n{RESTARTED_MARK}\n")
        log_start = old.log.stat().st_size
        return self._spawn(name, old.args, mode="a"), log_start

    def node_id(self, name: str) -> int | None:
        """The node id the SuperLink gave SuperNode `name` (its log's last `SuperNode ID`),
        None before it was taken."""
        ids = NODE_ID.findall(self.process(name).log.read_text(errors="replace"))
        return int(ids[-1]) if ids else None

    def _wait_for_node_back(self, node: Started, log_start: int, deadline: float) -> bool:
        """True once the restarted `node` logged its node id after `log_start` and the
        SuperLink lists that node online; False if the SuperLink refused it; raise on
        its exit or at `deadline`."""
        while time.monotonic() < deadline:
            with node.log.open("rb") as log:
                log.seek(log_start)
                text = log.read().decode(errors="replace")
            if REFUSED in text:
                return False
            if node.process.poll() is not None:
                raise DeploymentError(f"{node.name} exited with {node.process.returncode} after "
                                      f"its restart: {_tail(text)}")
            found = NODE_ID.findall(text)
            if found and int(found[-1]) in self.online_nodes():
                return True
            time.sleep(0.5)
        raise DeploymentError(f"{node.name} did not come back online within "
                              f"{self.node_timeout_s:.0f} s of its restart; log: {node.log}")

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
