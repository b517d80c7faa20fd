from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedsim.config import CONF_DIR, compose, from_run_config, to_run_config, validate
from fedsim.errors import ConfigError


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["partition=dirichlet", "partition.alpha=0"], "partition.alpha"),
        (["partition=dirichlet", "partition.alpha=-1"], "partition.alpha"),
        (["data.imbalance_factor=0"], "data.imbalance_factor"),
        (["data.imbalance_factor=1.5"], "data.imbalance_factor"),
        (["clients_per_round=7"], "clients_per_round"),
        (["num_clients=0"], "num_clients"),
        (["num_rounds=0"], "num_rounds"),
        (["evaluation.clients_per_round=9"], "evaluation.clients_per_round"),
        (["client.lr=-0.1"], "client.lr"),
        (["client.batch_size=2.5"], "client.batch_size"),
        (["strategy._target_=flwr.serverapp.strategy.NoSuchStrategy"], "strategy._target_"),
        (["partition.num_partitions=3"], "partition.num_partitions"),
        (["device=tpu"], "device"),
        (["dataset=npz"], "dataset.path"),
        (["client.momentum=-0.5"], "client.momentum"),
        (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
        (["backend=ray", "backend.num_actors=0"], "backend.num_actors"),
        (["strategy=bulyan", "strategy.num_malicious_nodes=1"], "clients_per_round"),
        (["strategy=multikrum", "strategy.num_nodes_to_select=4"],
         "strategy.num_nodes_to_select"),
        (["data.client_test_ratio=0"], "data.client_test_ratio"),
    ],
)
def test_bad_fields_are_named_with_what_is_allowed(tiny_cfg, overrides, field):
    """Preflight: config validation, then each group's own checks (constructors, check(spec))."""
    from fedsim.runtime import preflight

    with pytest.raises(ConfigError) as err:
        preflight(tiny_cfg(*overrides))
    assert str(err.value).startswith(field)
    assert "must be" in str(err.value) or "cannot import" in str(err.value)


def test_default_config_is_valid(tiny_cfg):
    validate(tiny_cfg())


def test_run_config_round_trip_is_read_only(tiny_cfg):
    cfg = from_run_config(to_run_config(tiny_cfg("seed=5")))
    assert cfg.seed == 5 and cfg.partition.num_partitions == cfg.num_clients
    with pytest.raises(Exception):  # noqa: B017 - omegaconf's ReadonlyConfigError
        cfg.seed = 1


def test_a_model_that_does_not_fit_the_dataset_is_a_config_error(tiny_cfg):
    from fedsim.experiment import run_experiment

    with pytest.raises(ConfigError, match="model=mlp fits any dataset"):
        run_experiment(tiny_cfg("dataset=digits", "model=cnn1d"))


METHODS = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_option_composes_a_run_that_passes_preflight(tmp_path, method):
    """`method=<name>` picks the method's strategy, client and model together."""
    from conftest import TINY

    from fedsim.runtime import preflight

    tiny = [o for o in TINY if not o.startswith("model=")]  # the method's own model
    cfg = compose([*tiny, f"output_dir={tmp_path / 'run'}", f"method={method}"])
    own = [group for group in ("strategy", "client")
           if (Path(CONF_DIR) / group / f"{method}.yaml").exists()]
    assert own or method == "fedavg_ft"  # FedAvg + FT: strategy=fedavg client=finetune
    for group in own:  # the method's option of the same name in its groups
        alone = compose([*tiny, f"{group}={method}"])[group]
        assert OmegaConf.to_yaml(cfg[group]) == OmegaConf.to_yaml(alone)  # unresolved
    preflight(cfg)


def test_command_line_choices_win_over_the_method():
    cfg = compose(["method=frl", "model=lenet"])
    assert cfg.strategy._target_.endswith("FRL") and cfg.model._target_.endswith("lenet")
