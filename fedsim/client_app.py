"""The fedsim ClientApp: one node's train and evaluate, on the configured trainer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
from omegaconf import DictConfig

from fedsim.clients.base import Trainer, round_seed
from fedsim.config import from_run_config
from fedsim.datasets.federated import ClientData
from fedsim.errors import ConfigError
from fedsim.fault_injection import inject_faults, poisoned
from fedsim.runtime import check_node_model, client_runtime, local_file_runtime

DATA_PATH = "data-path"  # a SuperNode's own .npz file instead of its share of the run's dataset


def make_client_app(config_json: str | None = None) -> ClientApp:
    """A ClientApp reading the fedsim config from `run_config` (or `config_json`)."""
    app = ClientApp()

    def node_inputs(msg: Message, context: Context
                    ) -> tuple[DictConfig, Trainer, ClientData]:
        cfg = from_run_config(context.run_config, config_json)
        partition_id = node_partition(context.node_config, cfg.num_clients)
        if DATA_PATH in context.node_config:
            path = str(context.node_config[DATA_PATH])
            runtime = local_file_runtime(cfg, path, partition_id)
            check_node_model(runtime, msg.content["arrays"], path)
            return cfg, runtime.trainer, runtime.data
        data, trainer = client_runtime(cfg)
        return cfg, trainer, data.client(partition_id)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, trainer, client_data = node_inputs(msg, context)
        config = _config(msg)
        server_round = int(config.get("server-round", 0))
        seed = round_seed(trainer.seed, client_data.partition_id, server_round) + 1
        fault = inject_faults(cfg.faults, trainer.seed, client_data.partition_id, server_round)
        with torch.random.fork_rng(devices=[]):  # dropout, augmentation: same on any backend
            # not torch.manual_seed: it also re-seeds every accelerator (~1 ms a call)
            torch.default_generator.manual_seed(seed)
            if trainer.device.type == "cuda":
                torch.cuda.manual_seed(seed)
            out = trainer.train(msg.content["arrays"], config, client_data, context.state)
        context.state = out.state
        arrays = poisoned(out.arrays) if fault.nan else out.arrays
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord(out.metrics)})
        for name, record in out.records.items():
            content[name] = record
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _, trainer, client_data = node_inputs(msg, context)
        metrics = trainer.evaluate(msg.content["arrays"], _config(msg), client_data, context.state)
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def node_partition(node_config: Mapping[str, object], num_clients: int) -> int:
    """This node's partition id from its `--node-config`, checked against the run."""
    partition = node_config.get(PARTITION_ID_KEY)
    if not isinstance(partition, int) or isinstance(partition, bool) \
            or not 0 <= partition < num_clients:
        raise ConfigError(
            f"node_config {PARTITION_ID_KEY} must be an integer in [0, {num_clients - 1}] for "
            f"this run's num_clients={num_clients} (got {partition!r})"
        )
    partitions = node_config.get(NUM_PARTITIONS_KEY, num_clients)
    if partitions != num_clients:
        raise ConfigError(
            f"node_config {NUM_PARTITIONS_KEY} must equal the run's num_clients={num_clients} "
            f"(got {partitions!r})"
        )
    return partition


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get("config", ConfigRecord())


app = make_client_app()
