"""Any Flower app works with fedsim, both ways.

A stock ClientApp (`tests/stock_app/task.py`, which imports nothing from fedsim) runs
under fedsim's server on each simulated backend and on SuperNodes; fedsim's ClientApp
runs under a plain Flower ServerApp with no fedsim config. Around them: Flower's
train-config convention, models of any signature, and what a mismatch reports.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from omegaconf import OmegaConf

from fedsim.backends.base import ClientAppFailed, describe_failure, failure_cause
from fedsim.backends.inprocess import InProcessGrid
from fedsim.clients.base import fit_problem
from fedsim.config import CONF_DIR, RUN_CONFIG_KEY, compose, to_run_config
from fedsim.errors import ConfigError, MessageError
from fedsim.experiment import run_experiment
from fedsim.runtime import build_model, initial_model, takes_argument
from fedsim.strategies.base import weights_as_delta_problem
from fedsim.train_config import client_settings, message_config, round_lr
from tests.conftest import read_metrics

pytestmark = pytest.mark.long_running(seconds=230)  # started first: conftest.py

STOCK = ["client_app=tests.stock_app.task:app", "model=custom",
         "model._target_=tests.stock_app.task.Net", "dataset=digits"]
ROOT = Path(__file__).resolve().parents[1]


def stock_run(tiny_cfg, *overrides: str) -> tuple[dict, list[dict]]:
    cfg = tiny_cfg(*STOCK, "num_rounds=3", *overrides)
    summary = run_experiment(cfg)
    return summary, read_metrics(cfg.output_dir)


def assert_learned_without_failures(summary: dict, rows: list[dict]) -> None:
    assert summary["train_failures"] == summary["evaluate_failures"] == 0
    assert summary["skipped_rounds"] == 0
    assert rows[-1]["server/accuracy"] > rows[0]["server/accuracy"] + 0.2
    assert all("client_eval/eval_acc" in row for row in rows[1:])  # its own metric names


# --- a stock ClientApp under fedsim's server -------------------------------------------------

@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_a_stock_client_app_trains_under_fedsim_in_process(tiny_cfg, strategy):
    extra = ["strategy.eta=0.01"] if strategy == "fedadam" else []
    summary, rows = stock_run(tiny_cfg, f"strategy={strategy}", *extra)
    assert_learned_without_failures(summary, rows)
    assert summary["clients"] == "ClientApp tests.stock_app.task:app"


def test_a_stock_client_app_trains_under_flowers_own_engine(tiny_cfg):
    """backend=flower gives ClientApps an empty run config: fedsim fills in the
    conventional keys the stock app reads (`local-epochs`, `batch-size`). FedProx, whose
    train messages also carry `proximal-mu`; the strategies themselves run the same on
    every backend (the in-process test above runs all three)."""
    full = ["num_clients=4", "clients_per_round=4", "evaluation.clients_per_round=4"]
    summary, rows = stock_run(tiny_cfg, "backend=flower", "strategy=fedprox", *full)
    assert_learned_without_failures(summary, rows)


def test_a_stock_client_app_on_ray_equals_in_process(tiny_cfg):
    """The same seeded RNG on any backend: the metrics agree to float rounding (the
    actors' processes may sum in another order)."""
    summary, rows = stock_run(tiny_cfg, "backend=ray", "backend.num_actors=2")
    assert_learned_without_failures(summary, rows)
    _, local = stock_run(tiny_cfg)
    for ray_row, local_row in zip(rows, local, strict=True):
        assert ray_row["server/accuracy"] == pytest.approx(local_row["server/accuracy"],
                                                           abs=1e-6)


def test_injected_faults_hit_a_stock_client_app_as_they_hit_fedsims(tiny_cfg, caplog):
    summary, _ = stock_run(tiny_cfg, "faults.crash_prob=0.4")
    fedsim_cfg = tiny_cfg("dataset=digits", "num_rounds=3", "faults.crash_prob=0.4")
    assert summary["train_failures"] == run_experiment(fedsim_cfg)["train_failures"] > 0
    assert "InjectedFaultError: injected crash (faults.crash_prob) in round" in caplog.text


def test_a_delta_strategy_refuses_a_stock_client_app_up_front(tiny_cfg):
    with pytest.raises(ConfigError, match="client_app=tests.stock_app.task:app is a Flower "
                                          "ClientApp, which uploads trained weights"):
        run_experiment(tiny_cfg(*STOCK, "strategy=fedld"))


@pytest.mark.parametrize(("value", "message"), [
    ("task", "must be module:attribute"),
    ("no_such_module_xyz:app", "cannot import 'no_such_module_xyz'"),
    ("tests.stock_app.task:nope", "has no attribute 'nope'"),
    ("tests.stock_app.task:Net", "is a type, not a flwr.clientapp.ClientApp"),
])
def test_a_bad_client_app_is_refused_by_name(tiny_cfg, value, message):
    with pytest.raises(ConfigError, match=message):
        run_experiment(tiny_cfg(*STOCK[1:], f"client_app={value}"))


# --- fedsim's ClientApp under a plain Flower server -------------------------------------------

def plain_server_app(initial: ArrayRecord, results: list, rounds: int = 3) -> ServerApp:
    """A ServerApp as Flower's templates write it: FedAvg, a train config with `lr` and
    `local-epochs`, no fedsim config anywhere."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0)
        results.append(strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=rounds,
            train_config=ConfigRecord({"lr": 0.05, "local-epochs": 1})))

    return app


def fedsims_default_model() -> ArrayRecord:
    """The model fedsim's ClientApp builds with no config: fedsim/conf/'s defaults."""
    from fedsim.datasets.federated import build_federated_data

    cfg = compose(["num_clients=4", "clients_per_round=4"])
    return ArrayRecord(initial_model(cfg, build_federated_data(cfg)).state_dict())


def test_fedsims_client_app_runs_under_a_plain_flower_server_on_flowers_engine():
    from fedsim.backends.flower import run_flower_simulation
    from fedsim.client_app import app as fedsim_client_app

    results: list = []
    run_flower_simulation(plain_server_app(fedsims_default_model(), results),
                          fedsim_client_app, 4, 1, 0.0)
    (result,) = results
    accuracy = {r: m["accuracy"] for r, m in result.evaluate_metrics_clientapp.items()}
    assert sorted(accuracy) == [1, 2, 3]  # every round's evaluation came back
    assert accuracy[3] > accuracy[1]
    assert len(result.train_metrics_clientapp) == 3


def test_fedsims_client_app_takes_the_federation_size_from_the_node_config():
    """No fedsim config: 4 partitions, as the nodes say, not the default 20 clients."""
    from fedsim.client_app import node_run_config

    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                                                        "num-partitions": 4},
                      state=RecordDict(), run_config={})
    assert node_run_config(context).num_clients == 4
    context.run_config["overrides"] = "num_clients=8 num_rounds=2"
    assert node_run_config(context).num_clients == 8  # the run's overrides say otherwise


def test_a_global_model_that_does_not_fit_gets_fedsims_error_naming_keys_and_shapes():
    from fedsim.client_app import app as fedsim_client_app

    grid = InProcessGrid(fedsim_client_app, 4, run_config={})
    other = {k: v for k, v in fedsims_default_model().items()}
    first = next(iter(other))
    other[first] = Array(np.zeros((3, 3), dtype=np.float32))
    content = RecordDict({"arrays": ArrayRecord(other),
                          "config": ConfigRecord({"server-round": 1})})
    (reply,) = grid.send_and_receive([Message(content, dst_node_id=1, message_type="train")])
    cause = failure_cause(reply.error.reason)
    assert cause.startswith("MessageError: the server's arrays do not fit this client's model")
    assert f"'{first}' (3, 3) sent" in cause


# --- the deployment runtime: the stock app on SuperNodes -------------------------------------

def test_a_stock_client_app_runs_on_supernodes_with_tls_and_node_auth(tiny_cfg):
    cfg = tiny_cfg(*STOCK, "num_rounds=1", "num_clients=2", "clients_per_round=2",
                   "evaluation.clients_per_round=2", "backend=deployment",
                   "backend.timeout_s=600")
    assert cfg.backend.node_auth and not cfg.backend.insecure
    summary = run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["train_failures"] == rows[1]["evaluate_failures"] == 0
    assert rows[1]["client_eval/clients"] == 2
    assert summary["final_server_accuracy"] > rows[0]["server/accuracy"] + 0.2


# --- Flower's train-config convention --------------------------------------------------------

def test_the_train_config_carries_the_client_settings_under_flowers_names():
    client = {"lr": 0.1, "lr_decay": 0.5, "local_epochs": 2, "batch_size": 16,
              "proximal_mu": 0.01, "momentum": 0.9}
    assert client_settings(client) == {
        "lr": 0.1, "local-epochs": 2, "batch-size": 16, "proximal-mu": 0.01}
    assert round_lr(0.1, 0.5, 3) == 0.1 * 0.5**2  # what fedsim's trainers make of it


def test_fedsims_server_sends_them_in_every_train_message(tiny_cfg):
    from fedsim.client_app import app as fedsim_client_app
    from fedsim.server_app import app as server_app

    cfg = tiny_cfg("client.lr=0.07", "+train_config.mode=fast", "+evaluate_config.k=[1,2]")
    seen: list[tuple[str, dict]] = []

    class Recording(InProcessGrid):
        def execute(self, messages, timeout=None):
            seen.extend((m.metadata.message_type, dict(m.content["config"])) for m in messages)
            return super().execute(messages, timeout)

    from fedsim.backends.base import server_context
    from fedsim.runtime import driver_preflight, forget_preflight

    run_config = to_run_config(cfg)
    driver_preflight(cfg)
    try:
        server_app(Recording(fedsim_client_app, cfg.num_clients, run_config),
                   server_context(run_config))
    finally:
        forget_preflight(cfg)
    train = [config for kind, config in seen if kind == "train"]
    assert len(train) == cfg.num_rounds * cfg.clients_per_round
    assert all(c == {"lr": 0.07, "local-epochs": 1, "batch-size": 32, "proximal-mu": 0.0,
                     "mode": "fast", "server-round": c["server-round"]} for c in train)
    evaluate = [config for kind, config in seen if kind == "evaluate"]
    assert evaluate and all(c == {"k": [1, 2], "server-round": c["server-round"]}
                            for c in evaluate)


def test_the_run_config_carries_them_too_and_the_app_declares_them(tiny_cfg):
    run_config = to_run_config(tiny_cfg("client.lr=0.2"))
    assert {k: run_config[k] for k in ("lr", "local-epochs", "batch-size")} == {
        "lr": 0.2, "local-epochs": 1, "batch-size": 32}
    assert RUN_CONFIG_KEY in run_config
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    sgd = OmegaConf.load(Path(CONF_DIR) / "client" / "sgd.yaml")
    # `flwr run` keeps only declared keys; their defaults mirror the SGD client's
    assert {k: declared["config"][k] for k in ("lr", "local-epochs", "batch-size",
                                                "proximal-mu")} == {
        "lr": sgd.lr, "local-epochs": sgd.local_epochs, "batch-size": sgd.batch_size,
        "proximal-mu": sgd.proximal_mu}


def test_the_servers_value_wins_over_the_trainers_own(tiny_cfg):
    from fedsim.datasets.federated import build_federated_data
    from fedsim.runtime import build_trainer

    cfg = tiny_cfg("client.lr=0.1", "client.lr_decay=0.5", "client.batch_size=8")
    trainer = build_trainer(cfg, build_federated_data(cfg))
    own = trainer.round_settings(ConfigRecord({"server-round": 2}))
    assert (own.lr, own.local_epochs, own.batch_size, own.proximal_mu) == (0.05, 1, 8, 0.0)
    sent = trainer.round_settings(ConfigRecord({"server-round": 2, "lr": 0.3,
                                                "local-epochs": 4, "batch-size": 64,
                                                "proximal-mu": 0.1}))
    # the server's lr is decayed as the trainer's own: 0.3 * 0.5^(2 - 1)
    assert (sent.lr, sent.local_epochs, sent.batch_size, sent.proximal_mu) == (0.15, 4, 64, 0.1)
    with pytest.raises(MessageError, match="'batch-size' must be an integer > 0"):
        trainer.round_settings(ConfigRecord({"batch-size": 0}))


def test_extra_message_config_entries_are_checked():
    assert message_config({"mode": "fast", "k": [1, 2]}, "train_config") == {
        "mode": "fast", "k": [1, 2]}
    with pytest.raises(ConfigError, match="train_config.bad must be a number, string"):
        message_config({"bad": {"nested": 1}}, "train_config")
    with pytest.raises(ConfigError, match="train_config.mixed"):
        message_config({"mixed": [1, "a"]}, "train_config")


# --- models of any signature -----------------------------------------------------------------

class NoArguments(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(40, 10)

    def forward(self, x):
        return self.fc1(x.flatten(1))


class ClassesOnly(NoArguments):
    def __init__(self, num_classes: int, width: int = 40) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(width, num_classes)


def any_kwargs(**kwargs) -> torch.nn.Module:
    return ClassesOnly(kwargs["num_classes"], width=int(np.prod(kwargs["input_shape"])))


@pytest.mark.parametrize(("target", "passed"), [
    (NoArguments, set()), (ClassesOnly, {"num_classes"}),
    (any_kwargs, {"num_classes", "input_shape"}),
])
def test_a_model_gets_only_the_shapes_its_signature_takes(target, passed):
    assert {k for k in ("input_shape", "num_classes") if takes_argument(target, k)} == passed
    node = OmegaConf.create({"_target_": f"{__name__}.{target.__name__}"})
    model = build_model(node, [1, 40], 10)
    assert model(torch.zeros(2, 1, 40)).shape == (2, 10)


def test_a_model_that_needs_an_argument_says_which_and_how_to_give_it(tiny_cfg):
    cfg = tiny_cfg("model=custom", f"model._target_={__name__}.ClassesOnly")
    run_experiment(cfg)  # num_classes given, width defaulted: fits MNIST-1D's 40 inputs
    cfg = tiny_cfg("model=custom", "model._target_=torch.nn.Linear")
    with pytest.raises(ConfigError, match=r"cannot be built from the settings \{\}: TypeError: "
                                          r".*in_features.*\+model.<name>=<value>"):
        run_experiment(cfg)


def test_overriding_only_the_target_points_to_model_custom(tiny_cfg):
    with pytest.raises(ConfigError, match="start from model=custom model._target_=tests"):
        run_experiment(tiny_cfg("model=cnn1d", "model._target_=tests.stock_app.task.Net"))


# --- pure helpers, worked by hand --------------------------------------------------------------

def test_fit_problem_names_the_first_differences():
    model = {"a": (2, 3), "b": (3,), "c": (1,)}
    assert fit_problem({"a": (2, 3), "b": (3,), "c": (1,)}, model) is None
    assert fit_problem({"a": (3, 2), "b": (3,), "z": (1,)}, model) == (
        "missing keys ['c']; unexpected keys ['z']; 'a' (3, 2) sent, (2, 3) here")
    assert fit_problem({}, model, shown=1) == "missing keys ['a'] and 2 more"


def test_weights_uploaded_as_a_delta_are_recognized():
    """w = (3, 4, 0), ||w|| = 5. Weights u = w + (0.1, 0, 0): ||u - w|| = 0.1 < 0.5 ||u||
    = 0.5 * 5.06: weights. A delta d = (0.1, -0.2, 0.2): ||d - w|| = 5.02 > 0.5 * 0.3:
    a delta. A long aligned delta d = 1.6 w = (4.8, 6.4, 0): ||d - w|| = 3 < 0.5 * 8 = 4:
    read as weights (the rule's blind spot, far beyond what local training produces)."""
    sent = {"w": np.array([3.0, 4.0, 0.0], dtype=np.float32)}
    weights = {"w": np.array([3.1, 4.0, 0.0], dtype=np.float32)}
    assert "uploads weights, not deltas" in weights_as_delta_problem(weights, sent)
    assert weights_as_delta_problem({"w": np.array([0.1, -0.2, 0.2])}, sent) is None
    assert weights_as_delta_problem({"w": 1.6 * sent["w"]}, sent) is not None
    assert weights_as_delta_problem({"w": np.zeros(3)}, sent) is None  # an empty update


def test_fedld_rejects_a_weights_upload_in_its_reply_check():
    from fedsim.strategies.fedld import FedLD

    strategy = FedLD()
    sent = {"w": np.array([3.0, 4.0, 0.0], dtype=np.float32)}
    upload = ArrayRecord({"w": Array(np.array([3.1, 4.0, 0.0], dtype=np.float32))})
    assert "uploads weights" in strategy.upload_problem(upload, sent)
    delta = ArrayRecord({"w": Array(np.array([0.1, -0.2, 0.2], dtype=np.float32))})
    assert strategy.upload_problem(delta, sent) is None


RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
    ".run()\x1b[39m (pid=1)\n  File \"task.py\", line 52, in train\n    lr = msg.content"
    "[\"config\"][\"lr\"]\nKeyError: 'lr'\n\nThe above exception was the direct cause of the "
    "following exception:\n\nfedsim.backends.base.ClientAppFailed: KeyError: 'lr' (at "
    "task.py:52 in train)\n\nflwr.clientapp.client_app.ClientAppException: \nException "
    "ClientAppException occurred. Message: KeyError: 'lr' (at task.py:52 in train)'>")


@pytest.mark.parametrize(("reason", "cause"), [
    (RAY_REASON, "KeyError: 'lr' (at task.py:52 in train)"),  # Flower's Ray engine
    ("<class 'KeyError'>:<''lr''>", "KeyError: 'lr'"),  # a SuperNode, a foreign raise
    ("<class 'fedsim.backends.base.ClientAppFailed'>:<'ValueError: bad (at a.py:3 in f)'>",
     "ValueError: bad (at a.py:3 in f)"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
     "ZeroDivisionError: division by zero", "ZeroDivisionError: division by zero"),
    ("reply rejected by the server: no content", "reply rejected by the server: no content"),
])
def test_a_failure_is_logged_by_its_cause(reason, cause):
    assert failure_cause(reason) == cause


def test_a_client_failure_names_its_type_message_and_frame():
    def train():
        return {}["lr"]

    try:
        train()
    except KeyError as err:
        line = describe_failure(err)
    assert line.startswith("KeyError: 'lr' (at test_flower_apps.py:") and line.endswith(
        " in train)")
    assert issubclass(ClientAppFailed, Exception)
