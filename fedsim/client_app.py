"""The fedsim ClientApp: one node's train and evaluate, on the configured trainer."""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.clients.base import Trainer, round_seed
from fedsim.config import from_run_config
from fedsim.datasets.federated import ClientData
from fedsim.runtime import client_runtime

PARTITION_ID = "partition-id"


def make_client_app(config_json: str | None = None) -> ClientApp:
    """A ClientApp reading the fedsim config from `run_config` (or `config_json`)."""
    app = ClientApp()

    def node_inputs(context: Context) -> tuple[Trainer, ClientData]:
        data, trainer = client_runtime(from_run_config(context.run_config, config_json))
        return trainer, data.client(int(context.node_config[PARTITION_ID]))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        trainer, client_data = node_inputs(context)
        config = _config(msg)
        server_round = int(config.get("server-round", 0))
        seed = round_seed(trainer.seed, client_data.partition_id, server_round) + 1
        with torch.random.fork_rng(devices=[]):  # dropout, augmentation: same on any backend
            # not torch.manual_seed: it also re-seeds every accelerator (~1 ms a call)
            torch.default_generator.manual_seed(seed)
            if trainer.device.type == "cuda":
                torch.cuda.manual_seed(seed)
            out = trainer.train(msg.content["arrays"], config, client_data, context.state)
        context.state = out.state
        content = RecordDict({"arrays": out.arrays, "metrics": MetricRecord(out.metrics)})
        for name, record in out.records.items():
            content[name] = record
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        trainer, client_data = node_inputs(context)
        metrics = trainer.evaluate(msg.content["arrays"], _config(msg), client_data, context.state)
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get("config", ConfigRecord())


app = make_client_app()
