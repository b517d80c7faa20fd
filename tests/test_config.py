import pytest

from fedsim.config import from_run_config, to_run_config, validate
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
        (["client.lr=0"], "client.lr"),
        (["client.batch_size=2.5"], "client.batch_size"),
        (["strategy._target_=flwr.serverapp.strategy.NoSuchStrategy"], "strategy._target_"),
        (["partition.num_partitions=3"], "partition.num_partitions"),
        (["device=tpu"], "device"),
    ],
)
def test_bad_fields_are_named_with_what_is_allowed(tiny_cfg, overrides, field):
    with pytest.raises(ConfigError) as err:
        validate(tiny_cfg(*overrides))
    assert str(err.value).startswith(field)
    assert "must be" in str(err.value) or "cannot import" in str(err.value)


def test_default_config_is_valid(tiny_cfg):
    validate(tiny_cfg())


def test_run_config_round_trip_is_read_only(tiny_cfg):
    cfg = from_run_config(to_run_config(tiny_cfg("seed=5")))
    assert cfg.seed == 5 and cfg.partition.num_partitions == cfg.num_clients
    with pytest.raises(Exception):  # noqa: B017 - omegaconf's ReadonlyConfigError
        cfg.seed = 1


def test_missing_run_config_explains_how_to_start(tiny_cfg):
    with pytest.raises(ConfigError, match="fedsim-config"):
        from_run_config({})
