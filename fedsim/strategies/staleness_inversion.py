"""Staleness inversion (Wang & Gao, AAAI 2025): convert stale updates by gradient inversion.

When slow devices hold distinctive data, down-weighting their stale updates
throws that data's knowledge away. Instead, for each stale update `d_stale`
computed from the old global model `w_old`, the server estimates the client's
data by inverting the update (`fedsim.inversion.invert_update`: dummy inputs and
soft labels whose re-simulated local training from `w_old` reproduces
`d_stale`), then re-runs the client's procedure from the current model `w_t` on
that estimate and aggregates the fresh update `d_fresh` instead.

Switching back to the stale update (`fallback`), once it is closer to the truth
than the inverted one:

- `none`: always aggregate the converted update;
- `round`: plain stale aggregation after round `switch_round` (no inversion cost);
- `residual` (oracle-free): per update, compare how much the model drift changes
  the update on the estimated data, `|U(w_t) - U(w_old)|_1`, with how badly the
  estimate explains the received update, `|U(w_old) - d_stale|_1`; keep the fresh
  update only while the drift is the larger error;
- `oracle` (analysis only): train the client on `w_t` with its real data (the
  simulation holds it) and keep whichever update is closer to that truth.

`oracle_metrics` logs, for every conversion, both errors relative to the true
fresh update without acting on them. The reference discards its own inverted
update until the switch round because of a guard typo; here the converted
update is used as intended.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from omegaconf import DictConfig

from fedsim.clients.base import round_seed
from fedsim.datasets.federated import FederatedData
from fedsim.errors import ConfigError, require
from fedsim.inversion import (
    LABEL_LOSSES,
    LocalProcedure,
    Tensors,
    invert_update,
    simulate_update,
    update_distance,
    update_norm,
)
from fedsim.spec import RunSpec
from fedsim.strategies.stale import Arrays, StaleFedAvg, StaleUpdate

FALLBACKS = ("none", "round", "residual", "oracle")
UNROLL_WARNING = 25  # client steps per conversion above which the cost is worth a warning
log = logging.getLogger("fedsim")


class StalenessInversion(StaleFedAvg):
    """Stale FedAvg that aggregates stale updates converted by gradient inversion.

    Parameters
    ----------
    iterations : int
        Inversion steps per conversion (the reference runs 40k; warm starts from
        the client's previous estimate let a hundred do on a CPU).
    dummy_size : int
        Dummy samples per estimate (256 in the reference).
    inversion_lr : float
        Adam's lr on the sign of the gradient (x0.1 at 3/8, 5/8, 7/8).
    label_loss : str
        "soft_ce" (cross-entropy on softmax labels, the clients' own loss) or "bce"
        (the reference's BCE on log-softmax outputs).
    warm_start : bool
        Start from the client's previous estimate instead of N(0, 1) noise.
    clamp_inputs : bool
        Keep dummy inputs within the range of the server's test inputs.
    fallback : str
        When to aggregate the stale update instead: none, round, residual, oracle.
    switch_round : int | None
        With fallback "round": the last round that converts.
    oracle_metrics : bool
        Log each conversion's error against the true fresh update (analysis).
    min_staleness : int
        Convert only updates at least this stale; fresher ones are aggregated as
        they are (asynchronous buffers make most updates a version or two old).
    """

    #: rebuilt from the config by `bind_run`; not part of a checkpoint
    not_checkpointed = ("model", "trainer", "data")

    def __init__(
        self,
        iterations: int = 100,
        dummy_size: int = 64,
        inversion_lr: float = 0.1,
        label_loss: str = "soft_ce",
        warm_start: bool = True,
        clamp_inputs: bool = True,
        fallback: str = "none",
        switch_round: int | None = None,
        oracle_metrics: bool = False,
        min_staleness: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_inversion_settings(iterations, dummy_size, inversion_lr, label_loss, fallback,
                                 switch_round, min_staleness)
        self.iterations = iterations
        self.dummy_size = dummy_size
        self.inversion_lr = float(inversion_lr)
        self.label_loss = label_loss
        self.warm_start = warm_start
        self.clamp_inputs = clamp_inputs
        self.fallback = fallback
        self.switch_round = switch_round
        self.oracle_metrics = oracle_metrics
        self.min_staleness = min_staleness
        self.estimates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def check(cls, spec: RunSpec) -> None:
        """The server re-runs the clients' plain SGD steps, in eval mode: the client must be
        sgd without extras, the optimizer plain SGD, and the model without batch norm."""
        super().check(spec)
        cfg, client = spec.cfg, spec.cfg.client
        require(str(client._target_) == "fedsim.clients.sgd.SGDTrainer", "client",
                "sgd for staleness_inversion (the server re-runs the clients' SGD steps)",
                str(client._target_))
        require(client.proximal_mu == 0 and not client.cosine_epochs, "client",
                "plain SGD for staleness_inversion (proximal_mu 0, cosine_epochs false)",
                f"proximal_mu={client.proximal_mu}, cosine_epochs={client.cosine_epochs}")
        require(str(cfg.optimizer._target_) == "torch.optim.SGD", "optimizer",
                "sgd for staleness_inversion (the server unrolls SGD steps)",
                str(cfg.optimizer._target_))
        extra = sorted(set(cfg.optimizer) - {"_target_", "_partial_", "momentum"})
        require(not extra and cfg.optimizer.get("momentum", 0.0) == client.momentum,
                "optimizer", "plain sgd with client.momentum for staleness_inversion (the "
                "server unrolls lr, momentum and weight decay only)",
                f"extra keys {extra}, momentum {cfg.optimizer.get('momentum')}")
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               for m in spec.model.modules()):
            raise ConfigError(
                f"model: staleness_inversion cannot re-run clients of a model with batch "
                f"normalization (model {spec.cfg.model._target_}); use one without it (mlp, "
                "cnn1d, or model.norm=group where the model offers it)"
            )

    def bind_run(self, cfg: DictConfig, data: FederatedData) -> None:
        """Build the model and the clients' trainer the server re-runs; read the input range."""
        from fedsim.runtime import build_trainer, model_factory

        super().bind_run(cfg, data)
        self.seed = cfg.seed
        self.model = model_factory(cfg, data)().eval()
        self.trainer = build_trainer(cfg, data, device="cpu")
        self.data = data
        self.num_train = {i + 1: int(n) for i, n in enumerate(data.label_counts().sum(1))}
        self.input_shape = tuple(data.input_shape)
        self.num_classes = data.num_classes
        x_test, _ = data.server_test()
        self.input_range = (float(x_test.min()), float(x_test.max()))
        steps = max(self.procedure(node, 1).steps for node in self.num_train)
        if steps > UNROLL_WARNING:
            log.warning(
                "staleness_inversion unrolls up to %d client steps per conversion; full-batch "
                "clients (client.batch_size >= their data) keep it to local_epochs", steps)

    def procedure(self, node_id: int, server_round: int) -> LocalProcedure:
        """The node's local training as of `server_round`, as the server re-runs it."""
        return self.trainer.local_procedure(self.num_train[node_id], server_round)

    def correct(
        self, update: StaleUpdate, current: Arrays, staleness: int
    ) -> tuple[Arrays, dict[str, float]]:
        """The fresh update estimated by inversion (or the stale one, per `fallback`)."""
        node, version = update.dispatch.node_id, update.dispatch.version
        server_round = version + staleness
        if staleness < self.min_staleness or (
            self.fallback == "round" and server_round > self.switch_round
        ):
            return update.delta, {"converted": 0.0}
        began = time.perf_counter()
        names = [name for name, _ in self.model.named_parameters()]
        inversion = self._invert(node, version, update.start, update.delta, names)
        fresh = simulate_update(
            self.model, _tensors(current, names), self._buffers(current, names),
            inversion.inputs, inversion.labels, self.procedure(node, server_round),
            self.label_loss)
        stale = _tensors(update.delta, names)
        residual = inversion.distance
        drift = float(update_distance(fresh, inversion.update))
        scale = max(update_norm(stale), 1e-12)
        info = {
            "conversion-seconds": time.perf_counter() - began,
            "inversion-seconds": inversion.seconds,
            "inversion-residual": residual / scale,
            "inversion-drift": drift / scale,
        }
        use_fresh = self.fallback not in ("residual", "oracle") or drift > residual
        if self.oracle_metrics or self.fallback == "oracle":
            truth = self._true_update(node, server_round, names)
            norm = max(update_norm(truth), 1e-12)
            info["oracle-error-stale"] = float(update_distance(stale, truth)) / norm
            info["oracle-error-inverted"] = float(update_distance(fresh, truth)) / norm
            if self.fallback == "oracle":
                use_fresh = info["oracle-error-inverted"] < info["oracle-error-stale"]
        info["converted"] = float(use_fresh)
        if not use_fresh:
            return update.delta, info
        converted = dict(update.delta)  # buffers (e.g. BatchNorm statistics) stay stale
        for name in names:
            converted[name] = fresh[name].numpy().astype(np.float64)
        return converted, info

    def _invert(self, node: int, version: int, start: Arrays, delta: Arrays, names: list[str]):
        inputs, labels = self._initial_estimate(node, version)
        inversion = invert_update(
            self.model, _tensors(start, names), self._buffers(start, names),
            _tensors(delta, names), self.procedure(node, version), inputs, labels,
            self.iterations, self.inversion_lr,
            self.input_range if self.clamp_inputs else None, self.label_loss,
        )
        self.estimates[node] = (inversion.inputs, inversion.labels)
        return inversion

    def _initial_estimate(self, node: int, version: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The node's previous estimate (warm start), else N(0, 1) inputs and labels."""
        if self.warm_start and node in self.estimates:
            return self.estimates[node]
        generator = torch.Generator().manual_seed(round_seed(self.seed, node - 1, version))
        inputs = torch.randn(self.dummy_size, *self.input_shape, generator=generator)
        labels = torch.randn(self.dummy_size, self.num_classes, generator=generator)
        if self.clamp_inputs:
            inputs = inputs.clamp(*self.input_range)
        return inputs, labels

    def _buffers(self, arrays: Arrays, names: list[str]) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(np.asarray(value)) for key, value in arrays.items()
                if key not in names}

    def _true_update(self, node: int, server_round: int, names: list[str]) -> Tensors:
        """Analysis only: the update the client would send if trained on the current model."""
        current = self.versions[server_round]
        config = ConfigRecord({"server-round": server_round})
        out = self.trainer.train(current, config, self.data.client(node - 1), RecordDict())
        trained = out.arrays.to_torch_state_dict()
        start = current.to_torch_state_dict()
        return {name: (trained[name] - start[name]).double() for name in names}


def _tensors(arrays: Arrays, names: list[str]) -> dict[str, torch.Tensor]:
    """The named entries as float32 tensors (the model's dtype)."""
    return {name: torch.as_tensor(np.asarray(arrays[name]), dtype=torch.float32) for name in names}


def check_inversion_settings(
    iterations: int,
    dummy_size: int,
    inversion_lr: float,
    label_loss: str,
    fallback: str,
    switch_round: int | None,
    min_staleness: int = 1,
) -> None:
    """One named error for an inversion setting out of range."""
    for name, value in (("iterations", iterations), ("dummy_size", dummy_size),
                        ("min_staleness", min_staleness)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"strategy.{name} must be an integer >= 1 (got {value!r})")
    if not (isinstance(inversion_lr, int | float) and inversion_lr > 0):
        raise ConfigError(f"strategy.inversion_lr must be a number > 0 (got {inversion_lr!r})")
    if label_loss not in LABEL_LOSSES:
        raise ConfigError(f"strategy.label_loss must be one of {LABEL_LOSSES} (got {label_loss!r})")
    if fallback not in FALLBACKS:
        raise ConfigError(f"strategy.fallback must be one of {FALLBACKS} (got {fallback!r})")
    if fallback == "round" and not (isinstance(switch_round, int) and switch_round >= 0):
        raise ConfigError(
            f"strategy.switch_round must be an integer >= 0 with fallback 'round' "
            f"(got {switch_round!r})"
        )
