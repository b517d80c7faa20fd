"""Deployment on Flower's SuperLink/SuperNodes: TLS files, node keys, run config, and an
end-to-end run on loopback (TLS and SuperNode authentication on) against a simulation."""

from __future__ import annotations

import functools
import socket
import ssl
import stat
import sys
import time
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedsim.backends import deployment as deployment_backend
from fedsim.backends.deployment import check_deployment_settings
from fedsim.client_app import make_client_app, node_partition
from fedsim.config import from_run_config, to_run_config, validate
from fedsim.deployment import federation as federation_module
from fedsim.deployment import flwr_cli as flwr_cli_module
from fedsim.deployment.certificates import make_node_key, make_tls_files
from fedsim.deployment.errors import DeploymentError
from fedsim.deployment.federation import LocalFederation
from fedsim.deployment.flwr_cli import APP_DIR, staged_app, submit_run, write_connection
from fedsim.errors import ConfigError, DataError
from fedsim.experiment import run_experiment
from fedsim.runtime import (
    check_node_model,
    client_runtime,
    initial_model,
    local_file_runtime,
    preflight,
)
from tests.conftest import read_metrics, without_timing

pytestmark = pytest.mark.long_running(seconds=135)  # started first: conftest.py

# --------------------------------------------------------------------------- TLS and keys


def test_the_ca_signs_a_server_certificate_for_the_loopback_names(tmp_path):
    files = make_tls_files(tmp_path, hosts=["127.0.0.1", "localhost", "link.example.org"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600


def test_node_keys_are_what_flower_registers_and_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    key = make_node_key(tmp_path, "node-0")
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert try_load_public_key(key.public).startswith(b"-----BEGIN PUBLIC KEY-----")
    private = load_ssh_private_key(key.private.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert stat.S_IMODE(key.private.stat().st_mode) == 0o600


def test_flower_reads_the_connection_fedsim_writes(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    write_connection(tmp_path, "10.0.0.5:9093", tmp_path / "ca.crt", insecure=False)
    connection = read_superlink_connection()
    assert connection.address == "10.0.0.5:9093"
    assert connection.root_certificates == str((tmp_path / "ca.crt").resolve())
    assert not connection.insecure
    write_connection(tmp_path, "127.0.0.1:9093", None, insecure=True)
    assert read_superlink_connection().insecure


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"superlink": "no-port"}, "backend.superlink"),
    ({"superlink": "host:9093; rm -rf /"}, "backend.superlink"),
    ({"root_certificates": "ca.crt"}, "backend.root_certificates is for backend.superlink"),
    ({"superlink": "h:1", "root_certificates": "/no/such.crt"}, "no such file"),
    ({"superlink": "h:1", "root_certificates": __file__, "insecure": True}, "exclude each other"),
    ({"insecure": "yes"}, "backend.insecure"),
    ({"node_auth": 1}, "backend.node_auth"),
    ({"timeout_s": 0}, "backend.timeout_s"),
])
def test_bad_deployment_settings_are_refused_by_name(kwargs, field):
    settings = {"superlink": None, "root_certificates": None, "insecure": False,
                "node_auth": True, "timeout_s": 60, **kwargs}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_deployment_settings(**settings)


def test_the_cli_refuses_bad_deployment_settings_before_any_work(tiny_cfg):
    cfg = tiny_cfg("backend=deployment", "backend.superlink=nowhere")
    with pytest.raises(ConfigError, match="backend.superlink"):
        run_experiment(cfg)
    assert not (Path(cfg.output_dir) / "deployment").exists()


@pytest.mark.parametrize("overrides", [
    ("strategy=fedbuff", "devices=fixed"),
    ("attack=scaling", "attack.fraction=0.2"),
])
def test_attacks_and_delays_need_a_simulated_grid(tiny_cfg, overrides):
    with pytest.raises(ConfigError, match="backend must be inprocess or ray"):
        preflight(tiny_cfg("backend=deployment", *overrides))


def test_the_apps_receive_no_submitter_paths_and_an_absolute_output_dir(tiny_cfg, tmp_path):
    from fedsim.backends.deployment import deployed_config

    cfg = tiny_cfg("backend=deployment", "backend.superlink=10.0.0.5:9093",
                   f"backend.root_certificates={__file__}", "output_dir=relative/run")
    remote = deployed_config(cfg, local=False)
    assert dict(remote.backend) == {"_target_": cfg.backend._target_,
                                    "superlink": "10.0.0.5:9093"}
    assert remote.output_dir == "relative/run"
    local = deployed_config(tiny_cfg("backend=deployment", "output_dir=relative/run"), True)
    assert local.output_dir == str(Path("relative/run").resolve())
    validate(remote)  # what the ServerApp checks on the SuperLink's machine passes there


def test_flwr_failures_reported_in_json_become_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(flwr_cli_module, "flwr_cli", lambda *a, **k: (
        'Loading...\n{"success": false, "error-message": "FAB too large"}'))
    with pytest.raises(DeploymentError, match="FAB too large"):
        flwr_cli_module.flwr_json(["run", "."], tmp_path)
    monkeypatch.setattr(flwr_cli_module, "flwr_cli", lambda *a, **k: "no json here")
    with pytest.raises(DeploymentError, match="printed no JSON"):
        flwr_cli_module.flwr_json(["ls"], tmp_path)


# --------------------------------------------------------------------------- run config


def test_a_bare_flwr_run_composes_the_config_from_overrides():
    cfg = from_run_config({"overrides": "strategy=fedprox num_rounds=3 'model=mlp'",
                           "fedsim-config": ""})
    assert (cfg.num_rounds, cfg.model._target_) == (3, "fedsim.models.MLP")
    assert cfg.strategy._target_.endswith("FedProx")
    assert cfg.backend._target_.endswith("DeploymentBackend")  # it runs on a SuperLink
    assert from_run_config({}).num_rounds == from_run_config({"overrides": ""}).num_rounds
    with pytest.raises(ConfigError, match="run_config overrides"):
        from_run_config({"overrides": "strategy=no_such_strategy"})
    with pytest.raises(ConfigError, match="free of backend"):
        from_run_config({"overrides": "backend=ray"})


def test_the_fedsim_config_wins_over_overrides(tiny_cfg):
    cfg = tiny_cfg("num_rounds=7")
    run_config = {**to_run_config(cfg), "overrides": "num_rounds=3"}
    assert from_run_config(run_config).num_rounds == 7


def test_the_app_bundle_ships_the_package_and_the_configs(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(APP_DIR)
    # what fedsim submits: the same bundle, byte for byte, from the staged copy
    assert build_fab_from_disk(staged_app(APP_DIR, tmp_path)) == fab
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    for needed in ("fedsim/server_app.py", "fedsim/client_app.py",
                   "fedsim/deployment/__init__.py", "fedsim/deployment/federation.py",
                   "fedsim/conf/config.yaml", "fedsim/conf/backend/deployment.yaml",
                   "pyproject.toml"):
        assert needed in names
    assert not [name for name in names if name.startswith(("tests/", "docs/", "outputs/"))]


def _app(folder: Path, files: dict[str, str]) -> Path:
    for name, text in {"pyproject.toml": (APP_DIR / "pyproject.toml").read_text(),
                       **files}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _staged(app: Path, dest: Path) -> list[str]:
    staged = staged_app(app, dest)
    return sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())


@pytest.mark.parametrize(("gitignore", "kept"), [
    ("outputs/\n*.log\nlocal.yaml\n", []),
    ("outputs/\n!outputs/keep.py\n*.log\nlocal.yaml\n", ["outputs/keep.py"]),  # re-included
])
def test_the_staged_app_is_what_flower_would_ship(tmp_path, gitignore, kept):
    from flwr.cli.build import build_fab_from_disk

    app = _app(tmp_path / "app", {
        ".gitignore": gitignore, "fedsim/a.py": "A = 1\n", "fedsim/conf/c.yaml": "c: 1\n",
        "fedsim/data.bin": "x", "notes.log": "x", "local.yaml": "secret: 1\n",
        "outputs/run/model.py": "B = 2\n", "outputs/keep.py": "C = 3\n",
        ".venv/lib/site.py": "D = 4\n", "fedsim/__pycache__/a.py": "E = 5\n",
        "pkg/.venv/x.py": "F = 6\n", "README.md": "# app\n"})
    (app / "fedsim" / "link.py").symlink_to(app / "fedsim" / "a.py")
    assert _staged(app, tmp_path / "staged") == sorted([
        ".gitignore", "README.md", "fedsim/a.py", "fedsim/conf/c.yaml", "pkg/.venv/x.py",
        "pyproject.toml", *kept])  # Flower leaves out only the top-level .venv
    assert build_fab_from_disk(tmp_path / "staged") == build_fab_from_disk(app)


@pytest.mark.parametrize("staging", ["staging", "fedsim/staging"])
def test_the_app_is_staged_inside_its_own_folder_without_copying_the_copy(tmp_path, staging):
    app = _app(tmp_path, {"fedsim/a.py": "A = 1\n"})
    (tmp_path / staging).mkdir()  # as submit_run's temporary folder exists before the walk
    assert _staged(app, tmp_path / staging) == ["fedsim/a.py", "pyproject.toml"]


# --------------------------------------------------------------------------- node config


@pytest.mark.parametrize(("node_config", "message"), [
    ({}, "partition-id must be an integer in \\[0, 3\\]"),
    ({"partition-id": 4}, "partition-id"),
    ({"partition-id": "1"}, "partition-id"),
    ({"partition-id": 1, "num-partitions": 5}, "num-partitions must equal"),
])
def test_a_node_config_that_does_not_fit_the_run_is_refused(node_config, message):
    with pytest.raises(ConfigError, match=message):
        node_partition(node_config, 4)


def _write_node_file(path, n=30, features=40, nan_label=False):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n).astype(np.float64 if nan_label else np.int64)
    if nan_label:
        y[3] = np.nan
    np.savez(path, x=rng.normal(size=(n, features)).astype(np.float32), y=y,
             num_classes=np.array(10))


def test_a_node_trains_on_its_own_data_file(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    _write_node_file(tmp_path / "site.npz")
    run_config = to_run_config(cfg)
    data, _ = preflight(cfg)
    arrays = ArrayRecord(initial_model(cfg, data).state_dict())
    message = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=run_config,
                      node_config={"partition-id": 2, "num-partitions": 6,
                                   "data-path": str(tmp_path / "site.npz")})
    reply = make_client_app()(message, context)
    trained = reply.content["arrays"].to_torch_state_dict()
    assert int(reply.content["metrics"]["num-examples"]) == len(local_file_runtime(
        from_run_config(run_config), str(tmp_path / "site.npz"), 2).data.y_train)
    assert any(not torch.equal(trained[k], v) for k, v in arrays.to_torch_state_dict().items())


@pytest.mark.parametrize("method", [
    ["client=noprop", "model=noprop"],  # its own optimizer (AdamW) and network
    ["client=mono_forward"],                 # Mono-Forward: projections added to the model
], ids=["noprop", "mono_forward"])
def test_a_data_file_node_builds_its_trainer_like_a_simulated_client(tiny_cfg, tmp_path,
                                                                     method):
    """The same construction path: the configured optimizer and the extended global model."""
    cfg = tiny_cfg(*method)
    _write_node_file(tmp_path / "site.npz", n=60)
    data, _ = preflight(cfg)
    simulated = client_runtime(cfg)[1]
    node = local_file_runtime(cfg, str(tmp_path / "site.npz"), 0)
    probe = [torch.nn.Parameter(torch.zeros(2))]
    first = ConfigRecord({"server-round": 1})
    assert type(node.trainer.make_optimizer(probe, node.trainer.round_settings(first))) is \
        type(simulated.make_optimizer(probe, simulated.round_settings(first)))
    arrays = ArrayRecord(initial_model(cfg, data).state_dict())
    assert set(node.shapes) == set(arrays.keys())
    check_node_model(node, arrays, str(tmp_path / "site.npz"))
    message = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=to_run_config(cfg),
                      node_config={"partition-id": 0, "num-partitions": 6,
                                   "data-path": str(tmp_path / "site.npz")})
    reply = make_client_app()(message, context)
    assert set(reply.content["arrays"].keys()) == set(arrays.keys())


def test_a_node_data_file_with_nan_labels_is_refused(tiny_cfg, tmp_path):
    _write_node_file(tmp_path / "bad.npz", nan_label=True)
    with pytest.raises(DataError, match="node_config data-path .*NaN"):
        local_file_runtime(tiny_cfg(), str(tmp_path / "bad.npz"), 0)
    with pytest.raises(DataError, match="node_config data-path: no such file"):
        local_file_runtime(tiny_cfg(), str(tmp_path / "missing.npz"), 0)


def test_a_small_node_file_missing_classes_is_split_and_then_refused_by_shape(tiny_cfg,
                                                                              tmp_path):
    rng = np.random.default_rng(1)
    y = np.arange(25) % 8  # 25 samples of 8 of the run's 10 classes, no num_classes entry
    np.savez(tmp_path / "small.npz", x=rng.normal(size=(25, 40)).astype(np.float32), y=y)
    cfg = tiny_cfg()
    runtime = local_file_runtime(cfg, str(tmp_path / "small.npz"), 0)
    assert len(runtime.data.y_train) + len(runtime.data.y_test) == 25
    data, _ = preflight(tiny_cfg())
    server_arrays = ArrayRecord(initial_model(cfg, data).state_dict())
    with pytest.raises(DataError, match="store the run's class count as num_classes"):
        check_node_model(runtime, server_arrays, str(tmp_path / "small.npz"))


# --------------------------------------------------------------------------- end to end


def _processes_with(flwr_home: Path) -> list[int]:
    """Pids of live processes whose environment names this FLWR_HOME."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE \
                    and proc.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_stop_ends_a_started_process_and_what_it_started_in_another_session(tmp_path):
    child = "import time; time.sleep(120)"
    parent = ("import subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); "
              "time.sleep(120)")
    federation = LocalFederation(tmp_path, num_nodes=1)
    federation.directory.mkdir(parents=True, exist_ok=True)
    try:
        federation._spawn("parent", [sys.executable, "-c", parent])
        deadline = time.monotonic() + 30
        while len(_processes_with(federation.flwr_home)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_processes_with(federation.flwr_home)) == 2
    finally:
        federation.stop()
    assert _processes_with(federation.flwr_home) == []
    assert federation.pids_file.read_text().splitlines()[-1] == "# stopped"


def test_nodes_that_never_come_online_end_the_start_with_a_clear_error(tmp_path, monkeypatch):
    """Keys that were never registered: the start fails with the cause (the refusal, or at
    the latest the node timeout), it does not hang, and nothing it started is left."""
    real_flwr_json = federation_module.flwr_json

    def skip_registration(args, *rest, **kwargs):
        return {} if args[:2] == ["supernode", "register"] else real_flwr_json(args, *rest,
                                                                                **kwargs)

    monkeypatch.setattr(federation_module, "flwr_json", skip_registration)
    federation = LocalFederation(tmp_path / "fed", num_nodes=1, node_timeout_s=5)
    try:
        with pytest.raises(DeploymentError,
                           match="refused supernode-0|0 of 1 SuperNodes came online"), federation:
            pass
    finally:
        federation.stop()
    assert _processes_with(federation.flwr_home) == []


def test_an_earlier_failed_start_is_kept_aside_not_overwritten(tmp_path, monkeypatch):
    directory = tmp_path / "deployment"
    (directory / "certificates").mkdir(parents=True)
    (directory / "certificates" / "server.key").write_text("earlier key")

    def no_superlink(self):
        raise DeploymentError("superlink failed")

    monkeypatch.setattr(LocalFederation, "_start_superlink", no_superlink)
    with pytest.raises(DeploymentError, match="superlink failed"), \
            LocalFederation(directory, num_nodes=1):
        pass
    assert (tmp_path / "deployment.failed1" / "certificates" / "server.key").read_text() == \
        "earlier key"
    assert (directory / "certificates" / "server.key").read_text() != "earlier key"


def test_a_tls_deployment_with_node_auth_matches_the_simulation(tiny_cfg, monkeypatch):
    """2 SuperNodes, 1 round, TLS on; an unregistered SuperNode is refused; every process
    the backend started is gone afterwards; the metrics equal an in-process simulation's.
    One round (each cost ~35 s here): no test compares later deployed rounds with a
    simulation; test_deployment_faults runs 3 on SuperNodes, checking replies only."""
    overrides = ["num_clients=2", "clients_per_round=2", "evaluation.clients_per_round=2",
                 "num_rounds=1"]
    simulated = tiny_cfg(*overrides)
    deployed = tiny_cfg(*overrides, "backend=deployment", "backend.timeout_s=600")
    federations: list[LocalFederation] = []

    def with_an_intruder(*args, **kwargs):
        federation = LocalFederation(*args, **kwargs, unregistered_nodes=1)
        federations.append(federation)
        return federation

    def check_tls_then_submit(*args, **kwargs):
        federation = federations[0]
        host, port = federation.fleet_address.rsplit(":", 1)
        context = ssl.create_default_context(cafile=federation.tls_files.ca_cert)
        context.set_alpn_protocols(["h2"])
        with socket.create_connection((host, int(port))) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            handshakes.append(tls.version())  # the Fleet API serves the CA's certificate
        return submit_run(*args, **kwargs)

    handshakes: list[str] = []
    monkeypatch.setattr(deployment_backend, "LocalFederation",
                        functools.wraps(LocalFederation)(with_an_intruder))
    monkeypatch.setattr(deployment_backend, "submit_run", check_tls_then_submit)
    run_experiment(deployed)
    run_experiment(simulated)

    federation = federations[0]
    assert federation.tls and federation.node_auth
    assert handshakes and handshakes[0].startswith("TLS")
    work_dir = federation.directory
    intruder_log = (work_dir / "logs" / "unregistered-0.log").read_text()
    assert "Failed to activate SuperNode" in intruder_log
    pids = (work_dir / "pids").read_text().splitlines()
    assert len(pids) == 5 and pids[-1] == "# stopped"  # SuperLink, 2 nodes, 1 intruder
    assert _processes_with(federation.flwr_home) == []  # nor anything they started

    rows_sim, rows_dep = read_metrics(simulated.output_dir), read_metrics(deployed.output_dir)
    assert [r["round"] for r in rows_dep] == [0, 1]
    assert [r.get("client_eval/clients") for r in rows_dep] == [None, 2]  # both nodes
    for sim, dep in zip(without_timing(rows_sim), without_timing(rows_dep), strict=True):
        assert dep.keys() == sim.keys()
        for key, value in sim.items():
            assert dep[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
