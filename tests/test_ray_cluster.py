"""`backend=ray` on a real multi-node Ray cluster: a head and a second node on loopback.

The cluster is this module's own: started with `ray start --block` on free ports in a
temp dir, and torn down by ending those processes and whatever else runs from its
temp dir (never `ray stop`, which would stop every Ray session on the machine).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import read_metrics, without_timing

from fedsim.experiment import run_experiment

RAY_CLI = Path(sys.executable).with_name("ray")
pytestmark = pytest.mark.skipif(not RAY_CLI.exists(), reason="the `ray` CLI is not installed")
START_TIMEOUT_S = 90


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ports() -> list[str]:
    """Free ports for the agents of one node: two nodes on one host must not share them."""
    return [f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def start_node(args: list[str], temp_dir: str, log: Path) -> subprocess.Popen:
    """`ray start --block` in its own session, so that teardown can end exactly it."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(RAY_CLI), "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
             f"--temp-dir={temp_dir}", "--disable-usage-stats", *node_ports(), *args],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_nodes(address: str, count: int) -> None:
    """Until the cluster has `count` live nodes (the driver connects, looks, leaves)."""
    import ray

    deadline = time.monotonic() + START_TIMEOUT_S
    ray.init(address=address, logging_level="WARNING", configure_logging=False,
             log_to_driver=False)
    try:
        while len([n for n in ray.nodes() if n["Alive"]]) < count:
            assert time.monotonic() < deadline, f"the cluster at {address} has no {count} nodes"
            time.sleep(0.5)
    finally:
        ray.shutdown()


def end_processes(procs: list[subprocess.Popen], temp_dir: str) -> None:
    """SIGTERM the `ray start` processes (they stop their nodes), then SIGKILL any process
    still running from this cluster's temp dir (its workers, by their ids)."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    left = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout
    for pid in (int(p) for p in left.split() if int(p) != os.getpid()):
        with contextlib.suppress(ProcessLookupError):  # ended with its node meanwhile
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster():
    """Address (127.0.0.1:port) of a two-node cluster: the head and a node holding the
    custom resource `second`, one CPU each."""
    import ray

    assert not ray.is_initialized(), "another test left a Ray session open"
    temp_dir = tempfile.mkdtemp(prefix="fedsim-ray-", dir="/tmp")  # unix sockets: short path
    address = f"127.0.0.1:{free_port()}"
    log = Path(temp_dir) / "ray-start.log"
    procs = [start_node(["--head", f"--port={address.split(':')[1]}",
                         f"--ray-client-server-port={free_port()}",
                         "--include-dashboard=false"], temp_dir, log)]
    try:
        wait_for_nodes(address, 1)
        procs.append(start_node([f"--address={address}", '--resources={"second": 1}'],
                                temp_dir, log))
        wait_for_nodes(address, 2)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        end_processes(procs, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_run_on_a_two_node_cluster_serves_clients_on_both_and_matches_inprocess(
        tiny_cfg, ray_cluster, caplog):
    import ray

    overrides = ["partition=dirichlet", "num_rounds=3", "num_clients=8", "clients_per_round=4",
                 "evaluation.clients_per_round=3"]
    local = tiny_cfg(*overrides)
    remote = tiny_cfg(*overrides, "backend=ray", f"backend.address={ray_cluster}",
                      "backend.num_actors=2")
    run_experiment(local)
    try:
        with caplog.at_level(logging.INFO, logger="fedsim"):
            run_experiment(remote)
    finally:
        ray.shutdown()
    served = re.search(r"clients ran on (\d+) Ray node", caplog.text)
    assert served is not None and served.group(1) == "2", caplog.text
    # the same ClientApp and messages on both paths, replies in message order: exactly equal
    assert without_timing(read_metrics(local.output_dir)) == \
        without_timing(read_metrics(remote.output_dir))


def test_a_run_with_ray_address_in_the_environment_joins_the_running_cluster(
        tiny_cfg, ray_cluster, monkeypatch, caplog):
    """backend.address=null and RAY_ADDRESS set: the run uses that cluster (a sweep's or a
    series of runs' way to share one `ray start --head`), not a new local one."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    cfg = tiny_cfg("backend=ray", "num_clients=4", "clients_per_round=2")
    try:
        with caplog.at_level(logging.INFO, logger="fedsim"):
            run_experiment(cfg)
        port = ray_cluster.rsplit(":", 1)[1]  # Ray names the host by its own IP
        assert ray.get_runtime_context().gcs_address.endswith(f":{port}")
        assert ray.cluster_resources().get("second") == 1
    finally:
        ray.shutdown()
    assert "clients ran on 2 Ray node(s)" in caplog.text
