"""Flower's train-config convention: the client settings a server sends with each round.

Flower apps read their local training settings from the train message's config
(`msg.content["config"]["lr"]`) or from the run config
(`context.run_config["local-epochs"]`). fedsim's server sends the configured
client's `lr`, `local-epochs`, `batch-size` and `proximal-mu` in every train
config, beside `server-round`, and puts the same keys in the run config, so a stock
Flower ClientApp trains as configured. The `train_config` / `evaluate_config` maps
of the run config add any other keys (and win over these).

fedsim's trainers read these keys back (`fedsim.clients.sgd.SGDTrainer.round_settings`):
where a server sends one, **the server's value wins** over the trainer's own
setting, as Flower's FedProx already expects for `proximal-mu`. `lr` is the base
learning rate: fedsim's trainers apply their `lr_decay` to it by `server-round`
(a foreign ClientApp gets `client.lr` as it is). Under fedsim's own server both
are the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedsim.errors import ConfigError

SERVER_ROUND = "server-round"
LR = "lr"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
PROXIMAL_MU = "proximal-mu"
#: evaluate config: epochs of local fine-tuning before a second score (`evaluation.finetune_epochs`)
FINETUNE_EPOCHS = "finetune-epochs"
#: client config field -> the key Flower apps read
CONVENTION = {"lr": LR, "local_epochs": LOCAL_EPOCHS, "batch_size": BATCH_SIZE,
              "proximal_mu": PROXIMAL_MU}
#: what a config value sent in a message may be (Flower's ConfigRecord and UserConfig)
SCALARS = (bool, int, float, str)


def round_lr(lr: float, lr_decay: float, server_round: int) -> float:
    """The learning rate of round `server_round` (from 1): `lr * lr_decay^(r-1)`."""
    return lr * lr_decay ** max(server_round - 1, 0)


def client_settings(client: Mapping[str, Any]) -> dict[str, float | int]:
    """The client's conventional settings under Flower's names (those the client has)."""
    return {key: client[field] for field, key in CONVENTION.items() if field in client}


def message_config(entries: Mapping[str, Any], field: str) -> dict[str, Any]:
    """A user's `train_config` / `evaluate_config` map as ConfigRecord values, or a
    `ConfigError` naming the first entry that a Flower message cannot carry."""
    out: dict[str, Any] = {}
    for key, value in entries.items():
        items = list(value) if isinstance(value, list | tuple) else [value]
        if not items or not all(isinstance(v, SCALARS) for v in items) \
                or len({type(v) for v in items}) > 1:
            raise ConfigError(
                f"{field}.{key} must be a number, string or boolean, or a non-empty list of "
                f"one of them (what a Flower ConfigRecord carries); got {value!r}")
        out[str(key)] = value if not isinstance(value, tuple) else list(value)
    return out
