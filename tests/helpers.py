"""A trainer and a strategy that exercise the interface's less common paths."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedsim.clients.sgd import SGDTrainer
from fedsim.state import Checkpointed

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` as module `name` (scripts are not a package). It is registered
    in sys.modules before it runs: dataclasses look their module up there."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class RankingTrainer(SGDTrainer):
    """Uploads integer rankings of the trained weights and counts its rounds in local state."""

    def train(self, arrays, config, data, state):
        out = super().train(arrays, config, data, state)
        first = next(iter(out.arrays.values())).numpy().ravel()
        rankings = ArrayRecord({"ranking": Array(np.argsort(first).astype(np.int32))})
        local = state.config_records.get("local", ConfigRecord({"rounds": 0}))
        new_state = RecordDict({"local": ConfigRecord({"rounds": int(local["rounds"]) + 1})})
        out.arrays, out.state = rankings, new_state
        out.metrics["rounds_seen"] = int(local["rounds"]) + 1
        return out

    def evaluate(self, arrays, config, data, state):
        metrics = super().evaluate(arrays, config, data, state)
        local = state.config_records.get("local", ConfigRecord({"rounds": 0}))
        metrics["local_rounds"] = int(local["rounds"])
        return metrics


class DtypeRecordingFedAvg(FedAvg):
    """Keeps the global arrays; records the dtypes that clients uploaded."""

    seen_dtypes: list[str] = []

    def upload_problem(self, upload, sent):
        """Any upload format is accepted (the test reads what the interface carries)."""
        return None

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                raise RuntimeError(msg.error.reason)
            for array in msg.content["arrays"].values():
                DtypeRecordingFedAvg.seen_dtypes.append(array.dtype)
        _, metrics = super().aggregate_train(server_round, replies)
        return None, metrics



class FailingTrainer(SGDTrainer):
    """Every training call fails."""

    def train(self, arrays, config, data, state):
        raise RuntimeError("client broke")


class FedAvgFailingInRound2(FedAvg):
    """A strategy bug: aggregation raises in round 2."""

    def aggregate_train(self, server_round, replies):
        if server_round == 2:
            raise RuntimeError("aggregation broke")
        return super().aggregate_train(server_round, replies)


class NoisyTrainer(SGDTrainer):
    """Draws from torch's global RNG (as dropout or augmentation would)."""

    def train(self, arrays, config, data, state):
        out = super().train(arrays, config, data, state)
        out.metrics["noise"] = float(torch.rand(()))
        return out


#: node id -> how HostileTrainer breaks that node's upload (other nodes train honestly)
HOSTILE = {
    1: "nan", 2: "inf", 3: "shape", 4: "dtype", 5: "missing-key", 6: "negative-examples",
    7: "huge-examples", 8: "two-arrayrecords", 9: "two-metricrecords", 10: "fractional-examples",
    11: "extra-metric",
}


class HostileTrainer(SGDTrainer):
    """Trains honestly, then breaks the reply of the node listed in `HOSTILE`."""

    def train(self, arrays, config, data, state):
        out = super().train(arrays, config, data, state)
        kind = HOSTILE.get(data.partition_id + 1)
        first = next(iter(out.arrays.keys()))
        values = {key: array.numpy() for key, array in out.arrays.items()}
        if kind == "nan":
            values[first] = np.full_like(values[first], np.nan)
        elif kind == "inf":
            values[first] = np.full_like(values[first], np.inf)
        elif kind == "shape":
            values[first] = values[first].ravel()[:-1]
        elif kind == "dtype":
            values[first] = values[first].astype(np.int32)
        elif kind == "missing-key":
            del values[first]
        elif kind == "negative-examples":
            out.metrics["num-examples"] = -5
        elif kind == "huge-examples":
            out.metrics["num-examples"] = 10**12
        elif kind == "fractional-examples":
            out.metrics["num-examples"] = 2.5
        elif kind == "extra-metric":
            out.metrics["evil"] = 1.0
        elif kind == "two-arrayrecords":
            out.records["extra"] = ArrayRecord({"x": Array(np.zeros(2))})
        elif kind == "two-metricrecords":
            out.records["extra"] = MetricRecord({"num-examples": 1})
        out.arrays = ArrayRecord({key: Array(value) for key, value in values.items()})
        return out


class CrashingNodesTrainer(SGDTrainer):
    """Raises on the nodes listed in `HOSTILE` (what a dropped hostile reply should equal)."""

    def train(self, arrays, config, data, state):
        if data.partition_id + 1 in HOSTILE:
            raise RuntimeError("this node fails")
        return super().train(arrays, config, data, state)


class LinearOnlyFedAvg(FedAvg):
    """A strategy from outside fedsim with a need across groups: a model of linear layers
    only (any other layer with parameters is refused), declared as `check(spec)`."""

    @classmethod
    def check(cls, spec) -> None:
        from fedsim.errors import ConfigError

        others = {type(m).__name__ for m in spec.model.modules()
                  if not isinstance(m, torch.nn.Linear)
                  and next(m.parameters(recurse=False), None) is not None}
        if others:
            raise ConfigError(f"model: helpers.LinearOnlyFedAvg needs linear layers only "
                              f"(model {spec.cfg.model._target_} has {sorted(others)})")


class ThresholdFedAvg(FedAvg):
    """A strategy from outside fedsim that checks its own argument in its constructor."""

    def __init__(self, threshold: float = 1.0, **kwargs) -> None:
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0 (got {threshold})")
        super().__init__(**kwargs)
        self.threshold = threshold


class ScaledLossTrainer(SGDTrainer):
    """A trainer from outside fedsim: SGD on `scale` times the loss, checked on construction."""

    def __init__(self, model_fn, scale: float = 1.0, **kwargs) -> None:
        from fedsim.errors import is_number, require

        require(is_number(scale) and scale > 0, "client.scale", "a number > 0", scale)
        super().__init__(model_fn, **kwargs)
        self.scale = scale

    def batch_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.scale * super().batch_loss(logits, targets)


class OwnLoopFedAvg(FedAvg):
    """A strategy with a round loop of its own, which the engine cannot record or resume."""

    def start(self, *args, **kwargs):
        return super().start(*args, **kwargs)


class CountingFedAvg(FedAvg):
    """A strategy from outside fedsim with state that grows by round (the replies it has
    aggregated, reported as a train metric), and no way to load a checkpoint of it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.replies_seen = 0

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.replies_seen += len(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            metrics["replies_seen"] = self.replies_seen
        return arrays, metrics


class CheckpointedCountingFedAvg(Checkpointed, CountingFedAvg):
    """`CountingFedAvg` that loads its checkpointed state itself, so it resumes."""


# --- a tiny network and plain SGD, shared by the baseline methods' tests -------------------

#: plain SGD steps (no momentum), one epoch, on the CPU
PLAIN_SGD = {"seed": 0, "lr": 0.1, "momentum": 0.0, "local_epochs": 1, "device": "cpu"}


def tiny_mlp():
    """The 6-feature, 3-class MLP the baseline tests train on `tests.test_trainer.blobs`."""
    from fedsim.models import MLP

    return MLP([6], 3, hidden=[8])


def tiny_arrays() -> ArrayRecord:
    """`tiny_mlp`'s initial weights, drawn from seed 0."""
    torch.manual_seed(0)
    return ArrayRecord(tiny_mlp().state_dict())


class PartitionRecordingTrainer(SGDTrainer):
    """SGD that records which partitions it trained and evaluated (in-process backend)."""

    trained: list[int] = []
    evaluated: list[int] = []

    def train(self, arrays, config, data, state):
        PartitionRecordingTrainer.trained.append(data.partition_id)
        return super().train(arrays, config, data, state)

    def evaluate(self, arrays, config, data, state):
        PartitionRecordingTrainer.evaluated.append(data.partition_id)
        return super().evaluate(arrays, config, data, state)
