"""The fedsim ClientApp: one node's train and evaluate, on the configured trainer, or on
the run's own Flower ClientApp (`client_app=module:attribute`) when it names one."""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator, Mapping

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import MessageType
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY
from omegaconf import DictConfig

from fedsim.backends.base import ClientAppFailed, describe_failure, with_message_id
from fedsim.clients.base import Trainer, TrainOutput, round_seed
from fedsim.config import OVERRIDES_KEY, RUN_CONFIG_KEY, from_run_config
from fedsim.datasets.federated import ClientData
from fedsim.errors import ConfigError, FedsimError, is_int
from fedsim.fault_injection import FaultDraw, inject_faults, poisoned
from fedsim.flower_apps import load_client_app
from fedsim.privacy.options import CLIP_MOD
from fedsim.runtime import check_node_model, client_runtime, local_file_runtime
from fedsim.train_config import FINETUNE_EPOCHS, SERVER_ROUND, client_settings

DATA_PATH = "data-path"  # a SuperNode's own .npz file instead of its share of the run's dataset
NO_FAULT = FaultDraw(False, False, 0.0)
#: Flower's client-side clipping mods, by the name central DP's wrappers send (`CLIP_MOD`)
CLIPPING_MODS = {"fixed": fixedclipping_mod, "adaptive": adaptiveclipping_mod}


class FedsimClientApp(ClientApp):
    """Flower's ClientApp with fedsim's train and evaluate, which hands every message to
    the run's `client_app` instead when the config names one (`run_foreign`)."""

    def __init__(self, config_json: str | None = None) -> None:
        super().__init__()
        self.config_json = config_json

    def __call__(self, message: Message, context: Context) -> Message:
        """The reply of fedsim's handlers or of the run's own app. What they raise is
        raised again as a `ClientAppFailed` naming it and its frame (Flower's engines
        report only `type: message`), except fedsim's own one-line errors."""
        try:
            cfg = node_run_config(context, self.config_json)
            if cfg.get("client_app"):
                foreign = load_client_app(cfg.client_app)
                return clipped(message, context,
                               lambda msg, ctx: run_foreign(foreign, cfg, msg, ctx))
            return clipped(message, context, super().__call__)
        except FedsimError:
            raise
        except Exception as err:
            raise ClientAppFailed(describe_failure(err)) from err


    def cohort_problem(self, messages: list[Message], contexts: list[Context]) -> str | None:
        """Why these train messages cannot be trained as one batched cohort
        (`train_cohort`), or None when they can: every message is fedsim's own training
        on the run's data, with nothing per client that a batch would skip. The caller
        passes train messages only (`fedsim.backends.inprocess.cohort_problem`)."""
        cfg = node_run_config(contexts[0], self.config_json)
        if cfg.get("client_app"):
            return "the run's own client_app trains its clients"
        if any(DATA_PATH in context.node_config for context in contexts):
            return "nodes hold their own data files (node_config data-path)"
        if any(_config(m).get(CLIP_MOD) for m in messages):
            return "privacy.clip_on=client clips each client's update"
        faults = cfg.faults
        if float(faults.crash_prob) or float(faults.nan_prob) or float(faults.hang_prob):
            return "faults.crash_prob, nan_prob or hang_prob inject per-client faults"
        if faults.timeout_s is not None:
            return "faults.timeout_s times each client's training on its own"
        _, trainer = client_runtime(cfg)
        return trainer.cohort_problem()

    def train_cohort(self, messages: list[Message], contexts: list[Context]) -> list[Message]:
        """The replies `train` gives, from one vectorized computation of the trainer
        (`Trainer.train_cohort`); each context's state is updated as `train` does.
        Callers check `cohort_problem` first."""
        cfg = node_run_config(contexts[0], self.config_json)
        data, trainer = client_runtime(cfg)
        jobs = [(m.content["arrays"], _config(m),
                 data.client(node_partition(c.node_config, cfg.num_clients)), c.state)
                for m, c in zip(messages, contexts, strict=True)]
        replies = []
        for msg, context, out in zip(messages, contexts, trainer.train_cohort(jobs),
                                     strict=True):
            context.state = out.state
            replies.append(with_message_id(train_reply(msg, out)))
        return replies


def train_reply(msg: Message, out: TrainOutput, nan: bool = False) -> Message:
    """The reply to a train message: the trainer's upload (NaN when a fault poisons it),
    its metrics and its further records."""
    content = RecordDict({"arrays": poisoned(out.arrays) if nan else out.arrays,
                          "metrics": MetricRecord(out.metrics)})
    for name, record in out.records.items():
        content[name] = record
    return Message(content=content, reply_to=msg)


def clipped(message: Message, context: Context, handle: ClientAppCallable) -> Message:
    """`handle`'s reply, through Flower's clipping mod when the server asks for client-side
    clipping (central DP with `privacy.clip_on=client`: the train config names the mod)."""
    if message.metadata.message_type != MessageType.TRAIN:
        return handle(message, context)
    mod = CLIPPING_MODS.get(str(_config(message).get(CLIP_MOD, "")))
    return handle(message, context) if mod is None else mod(message, context, handle)


def node_run_config(context: Context, config_json: str | None = None) -> DictConfig:
    """The fedsim config of this node's run (`fedsim.config.from_run_config`).

    A run started without a fedsim config (a plain Flower server, a bare `flwr run`)
    takes the federation's size from the node's `num-partitions` unless its
    `overrides` set `num_clients`; data, model and trainer are fedsim/conf/'s defaults.
    """
    run_config = context.run_config
    partitions = context.node_config.get(NUM_PARTITIONS_KEY)
    if run_config.get(RUN_CONFIG_KEY) or config_json or not is_int(partitions):
        return from_run_config(run_config, config_json)
    overrides = str(run_config.get(OVERRIDES_KEY, ""))
    if not any(word.startswith("num_clients=") for word in shlex.split(overrides)):
        overrides = f"{overrides} num_clients={partitions}".strip()
    return from_run_config({**run_config, OVERRIDES_KEY: overrides})


@contextlib.contextmanager
def seeded(seed: int, cuda: bool = False) -> Iterator[None]:
    """torch's global RNG seeded with `seed` inside, restored after: dropout and
    augmentation draw the same on any backend."""
    with torch.random.fork_rng(devices=[]):
        # not torch.manual_seed: it also re-seeds every accelerator (~1 ms a call)
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


def run_foreign(app: ClientApp, cfg: DictConfig, message: Message, context: Context
                ) -> Message:
    """`app`'s reply to `message`, as fedsim runs its own clients.

    The app sees the node's context with the run config's conventional client settings
    (`fedsim.train_config`) filled in where the engine has none (Flower's simulation
    passes an empty run config); train messages get fedsim's seeded RNG and its injected
    faults (`faults.*`), so a foreign client fails where fedsim's would.
    """
    view = Context(run_id=context.run_id, node_id=context.node_id,
                   node_config=context.node_config, state=context.state,
                   run_config={**client_settings(cfg.client), **context.run_config})
    fault, seed = NO_FAULT, cfg.seed
    if message.metadata.message_type == MessageType.TRAIN:
        partition_id = int(context.node_config.get(PARTITION_ID_KEY, 0))
        server_round = int(_config(message).get(SERVER_ROUND, 0))
        seed = round_seed(cfg.seed, partition_id, server_round) + 1
        fault = inject_faults(cfg.faults, cfg.seed, partition_id, server_round)
    with seeded(seed):
        reply = app(message, view)
    context.state = view.state
    if fault.nan and reply.has_content():
        for name, record in list(reply.content.array_records.items()):
            reply.content[name] = poisoned(record)
    return reply


def make_client_app(config_json: str | None = None) -> ClientApp:
    """A ClientApp reading the fedsim config from `run_config` (or `config_json`)."""
    app = FedsimClientApp(config_json)

    def node_inputs(msg: Message, context: Context
                    ) -> tuple[DictConfig, Trainer, ClientData]:
        cfg = node_run_config(context, config_json)
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
        with seeded(seed, cuda=trainer.device.type == "cuda"):
            out = trainer.train(msg.content["arrays"], config, client_data, context.state)
        context.state = out.state
        return train_reply(msg, out, fault.nan)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _, trainer, client_data = node_inputs(msg, context)
        config = _config(msg)
        metrics = trainer.evaluate(msg.content["arrays"], config, client_data, context.state)
        epochs = int(config.get(FINETUNE_EPOCHS, 0))
        if epochs:
            metrics |= trainer.finetuned_metrics(msg.content["arrays"], config, client_data,
                                                 context.state, epochs)
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
