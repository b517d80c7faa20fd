"""Plain backprop SGD, with the optional FedProx proximal term."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, partial

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsim.clients.base import (
    NUM_EXAMPLES,
    Trainer,
    TrainJob,
    TrainOutput,
    minibatches,
    predict,
)
from fedsim.clients.cohort import SGDRule, cohort_sgd, model_problem, padded_steps
from fedsim.datasets.federated import ClientData
from fedsim.errors import ConfigError, MessageError, is_int, is_number, require
from fedsim.inversion import LocalProcedure
from fedsim.metrics import classification_metrics, prefixed
from fedsim.npy import array_record
from fedsim.privacy.dp_sgd import DPSGD
from fedsim.spec import RunSpec
from fedsim.train_config import (
    BATCH_SIZE,
    LOCAL_EPOCHS,
    LR,
    PROXIMAL_MU,
    SERVER_ROUND,
    round_lr,
)


def proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """||w - w_global||^2 over trainable parameters (FedProx, Li et al. 2020)."""
    return sum(
        (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
    )


#: the prefix of the fine-tuned evaluation's metrics (`finetuned_metrics`)
FINETUNED = "finetuned-"
#: SGDTrainer's methods that define a round of training: a subclass that overrides one
#: trains otherwise, so `train_cohort`'s vectorized copy of them no longer applies
TRAINING_METHODS = ("train", "objective", "batch_loss", "upload", "sgd_epochs",
                    "make_optimizer", "round_settings", "load_model", "generator")
#: more local epochs than this per round is a typo (1e20 would train for ever, unstoppable)
MAX_LOCAL_EPOCHS = 10_000


def check_sgd_settings(*, lr: float, momentum: float, weight_decay: float, local_epochs: int,
                       batch_size: int, proximal_mu: float, lr_decay: float) -> None:
    """The local SGD settings in range; a bad one raises the one-line `ConfigError`."""
    require(is_int(batch_size) and batch_size > 0, "client.batch_size", "an integer > 0",
            batch_size)
    require(is_int(local_epochs) and 0 < local_epochs <= MAX_LOCAL_EPOCHS, "client.local_epochs",
            f"an integer in [1, {MAX_LOCAL_EPOCHS}]", local_epochs)
    # lr = 0 is allowed, as torch allows it: a control run whose clients upload what they got.
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                        ("proximal_mu", proximal_mu)):
        require(is_number(value) and value >= 0, f"client.{name}", "a number >= 0", value)
    require(momentum < 1, "client.momentum", "a number in [0, 1)", momentum)
    require(is_number(lr_decay) and lr_decay > 0, "client.lr_decay",
            "a number > 0 (round r trains at lr * lr_decay^(r-1))", lr_decay)


def require_sgd(spec: RunSpec, what: str) -> None:
    """Refuse an optimizer other than SGD for a rule whose math assumes SGD steps."""
    target = str(spec.cfg.optimizer.get("_target_", ""))
    if target != "torch.optim.SGD":
        raise ConfigError(f"optimizer: {what} assumes SGD steps; use optimizer=sgd "
                          f"(got {target})")


@dataclass(frozen=True)
class RoundSettings:
    """One round's local SGD settings: the trainer's own, except where the server's train
    config sends a value under Flower's name (`fedsim.train_config`): the server's wins."""

    server_round: int
    lr: float
    local_epochs: int
    batch_size: int
    proximal_mu: float


def sent_value(config: ConfigRecord, key: str, own: float, integer: bool = False) -> float:
    """`config[key]` when the server sent it (checked: a number >= 0, whole and > 0 for
    `integer`), else `own`."""
    if key not in config:
        return own
    value = config[key]
    ok = is_int(value) and value > 0 if integer else is_number(value) and value >= 0
    if not ok:
        wanted = "an integer > 0" if integer else "a number >= 0"
        raise MessageError(f"the server's train config '{key}' must be {wanted} "
                           f"(got {value!r})")
    return int(value) if integer else float(value)


class SGDTrainer(Trainer):
    """Local epochs of minibatch SGD on cross-entropy; uploads the trained weights.

    `proximal_mu` adds mu/2 * ||w - w_global||^2. The learning rate of round r
    (from 1) is `lr * lr_decay**(r - 1)`; `cosine_epochs` anneals it to 0 over the
    local epochs with a cosine, stepped once per epoch. Where the server's train
    config sends `lr` (decayed here as `lr` is), `local-epochs`, `batch-size` or
    `proximal-mu`, Flower's convention, the server's value is used (`round_settings`).
    With `dp_sgd` (`privacy=local`) the epochs are DP-SGD's (`fedsim.privacy.local`).

    `optimizer` builds the optimizer from (parameters, lr=, weight_decay=): the
    `optimizer` config group (sgd, adam, adamw, adamp, conda) as a partial; by
    default SGD with `momentum`. A fresh optimizer starts every round: optimizer
    state does not survive between rounds (as in FedAvg), so a round's update
    depends only on the received weights and the client's data. Only parameters
    that require gradients train (supermask networks train their scores alone).
    Subclasses change the per-batch objective (`batch_loss`) or what is sent back
    (`upload`), or run `sgd_epochs` on parameters and an objective of their own.
    """

    # These defaults mirror fedsim/conf/client/sgd.yaml, their source: change both together.
    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        seed: int = 0,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        local_epochs: int = 5,
        batch_size: int = 32,
        proximal_mu: float = 0.0,
        lr_decay: float = 1.0,
        cosine_epochs: bool = False,
        eval_batch_size: int = 1024,
        device: str = "auto",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        dp_sgd: DPSGD | None = None,
    ) -> None:
        super().__init__(model_fn, seed, eval_batch_size, device)
        check_sgd_settings(lr=lr, momentum=momentum, weight_decay=weight_decay,
                           local_epochs=local_epochs, batch_size=batch_size,
                           proximal_mu=proximal_mu, lr_decay=lr_decay)
        self.optimizer = optimizer or partial(torch.optim.SGD, momentum=momentum)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.proximal_mu = proximal_mu
        self.lr_decay = lr_decay
        self.cosine_epochs = cosine_epochs
        self.dp_sgd = dp_sgd

    def train(
        self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData, state: RecordDict
    ) -> TrainOutput:
        model = self.load_model(arrays)
        model.train()
        settings = self.round_settings(config)
        mu = settings.proximal_mu
        anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            loss = self.objective(model, x[idx], y[idx])
            return loss + mu / 2 * proximal_term(model, anchor) if mu > 0 else loss

        trainable = [p for p in model.parameters() if p.requires_grad]
        if self.dp_sgd is None:
            train_loss = self.sgd_epochs(trainable, data, settings, loss_of)
            reported = {"train_loss": train_loss}
        else:  # the loss of the private batches is not released: only the accounting
            _, reported = self.dp_sgd.train(
                model, self.make_optimizer(trainable, settings), x, y,
                batch_size=settings.batch_size, epochs=settings.local_epochs,
                generator=self.generator(data, settings.server_round),
                batch_loss=self.batch_loss)
        return TrainOutput(
            arrays=self.upload(model),
            metrics={**reported, NUM_EXAMPLES: data.num_train},
            state=state,
        )

    @cached_property
    def _cohort_problem(self) -> str | None:
        cls = type(self)
        changed = [name for name in TRAINING_METHODS
                   if getattr(cls, name) is not getattr(SGDTrainer, name)]
        if changed:
            return f"{cls.__name__} changes SGDTrainer's {', '.join(changed)}"
        if self.dp_sgd is not None:
            return "privacy=local clips and noises each sample's gradient (DP-SGD)"
        if self.cosine_epochs:
            return "client.cosine_epochs anneals the lr within the round"
        keywords = getattr(self.optimizer, "keywords", {})
        if getattr(self.optimizer, "func", None) is not torch.optim.SGD or set(keywords) - {
                "momentum"}:
            return f"the optimizer is not plain SGD ({self.optimizer})"
        with torch.random.fork_rng(devices=[]):  # must not consume the seeded stream
            return model_problem(self.model_fn())

    def cohort_problem(self) -> str | None:
        """None for plain SGD and FedProx (this class's own training, the SGD optimizer, a
        deterministic model without buffers); else what stands in the way."""
        return self._cohort_problem

    def train_cohort(self, jobs: Sequence[TrainJob]) -> list[TrainOutput]:
        """`train` for every job as vectorized SGD (`fedsim.clients.cohort`): the clients of
        each distinct round setting (lr, epochs, batch size, mu) train as one batch."""
        if self.cohort_problem() is not None:
            return super().train_cohort(jobs)
        groups: dict[RoundSettings, list[int]] = {}
        for i, (_, config, _, _) in enumerate(jobs):
            groups.setdefault(self.round_settings(config), []).append(i)
        outputs: list[TrainOutput | None] = [None] * len(jobs)
        for settings, members in groups.items():
            trained = self._train_together([jobs[i] for i in members], settings)
            for i, output in zip(members, trained, strict=True):
                outputs[i] = output
        return [output for output in outputs if output is not None]

    def _train_together(self, jobs: Sequence[TrainJob], settings: RoundSettings
                        ) -> list[TrainOutput]:
        """One setting's clients: each from its received weights, on its own batches."""
        starts, batches, offsets, xs, ys, offset = [], [], [], [], [], 0
        decoded: dict[int, dict[str, torch.Tensor]] = {}  # FedAvg sends one record to all
        for arrays, _, data, _ in jobs:
            if id(arrays) not in decoded:  # load_model checks the arrays fit the model
                decoded[id(arrays)] = {k: v.detach().clone()
                                       for k, v in self.load_model(arrays).state_dict().items()}
            starts.append(decoded[id(arrays)])
            generator = self.generator(data, settings.server_round)
            batches.append([idx for _ in range(settings.local_epochs)
                            for idx in minibatches(data.num_train, settings.batch_size,
                                                   generator)])
            offsets.append(offset)
            offset += data.num_train
            xs.append(data.x_train)
            ys.append(data.y_train)
        rows, weights, active = padded_steps(batches, offsets, settings.batch_size)
        rule = SGDRule(lr=settings.lr, momentum=float(
            getattr(self.optimizer, "keywords", {}).get("momentum", 0.0)),
            weight_decay=self.weight_decay, mu=settings.proximal_mu)
        device = self.device
        model = self._model  # built by load_model above; cohort_sgd reads its structure only
        params, totals = cohort_sgd(
            model, starts, torch.cat(xs).to(device), torch.cat(ys).to(device), rows.to(device),
            weights.to(device), active.to(device), rule)
        params = {k: v.cpu() for k, v in params.items()}
        totals = totals.cpu()
        return [
            TrainOutput(
                arrays=array_record({k: v[c] for k, v in params.items()}),
                metrics={"train_loss": totals[c, 0].item() / max(int(totals[c, 1]), 1),
                         NUM_EXAMPLES: data.num_train},
                state=state,
            )
            for c, (_, _, data, state) in enumerate(jobs)
        ]

    def round_settings(self, config: ConfigRecord) -> RoundSettings:
        """This round's settings: the server's where its train config sends them."""
        server_round = int(config.get(SERVER_ROUND, 0))
        return RoundSettings(
            server_round=server_round,
            lr=round_lr(sent_value(config, LR, self.lr), self.lr_decay, server_round),
            local_epochs=int(sent_value(config, LOCAL_EPOCHS, self.local_epochs, True)),
            batch_size=int(sent_value(config, BATCH_SIZE, self.batch_size, True)),
            proximal_mu=sent_value(config, PROXIMAL_MU, self.proximal_mu),
        )

    def local_procedure(self, num_train: int, server_round: int) -> LocalProcedure:
        """This trainer's local SGD as steps on one batch, for a server that re-runs it.

        `local_epochs * ceil(num_train / batch_size)` steps at the round's lr, with
        this momentum and weight decay (staleness inversion unrolls them).
        """
        if self.proximal_mu > 0 or self.cosine_epochs:
            raise ValueError("local_procedure: proximal_mu and cosine_epochs are not unrolled")
        if getattr(self.optimizer, "func", None) is not torch.optim.SGD:
            raise ValueError("local_procedure: only the SGD optimizer is unrolled")
        return LocalProcedure(
            lr=round_lr(self.lr, self.lr_decay, server_round),
            steps=self.local_epochs * math.ceil(num_train / self.batch_size),
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )

    def sgd_epochs(
        self,
        parameters: list[torch.Tensor],
        data: ClientData,
        settings: RoundSettings,
        batch_loss: Callable[[torch.Tensor], torch.Tensor],
        epochs: int | None = None,
    ) -> float:
        """Minibatch SGD on `parameters` over shuffled batches of the client's training indices.

        `batch_loss(idx)` gives the objective of one batch (indices on the trainer's
        device). A loss that still requires grad is backpropagated here; a trainer
        whose batch_loss runs its own backward passes (layer-local methods free each
        layer's graph as they go) returns it detached. Runs `epochs` (default
        `local_epochs`) epochs with this trainer's optimizer, lr schedule and weight
        decay; returns the mean batch loss. `settings` (`round_settings`) gives the
        round, its lr, epochs and batch size.
        """
        optimizer = self.make_optimizer(parameters, settings)
        epochs = settings.local_epochs if epochs is None else epochs
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
            if self.cosine_epochs else None
        )
        generator = self.generator(data, settings.server_round)
        loss_sum, steps = torch.zeros((), device=self.device), 0
        for _ in range(epochs):
            for idx in minibatches(data.num_train, settings.batch_size, generator):
                optimizer.zero_grad(set_to_none=True)
                loss = batch_loss(idx.to(self.device))
                if loss.requires_grad:
                    loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                steps += 1
            if scheduler is not None:
                scheduler.step()
        return loss_sum.item() / max(steps, 1)

    def make_optimizer(
        self, parameters: list[torch.Tensor], settings: RoundSettings
    ) -> torch.optim.Optimizer:
        """A fresh optimizer over `parameters` at the round's learning rate."""
        return self.optimizer(parameters, lr=settings.lr, weight_decay=self.weight_decay)

    def objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One batch's training loss: `batch_loss` of the model's logits.

        Methods that train without end-to-end backprop override it; see `sgd_epochs`
        for a loss that ran its own backward passes.
        """
        return self.batch_loss(model(x), y)

    def batch_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The objective minimized on each minibatch: cross-entropy."""
        return nn.functional.cross_entropy(logits, targets)

    def upload(self, model: nn.Module) -> ArrayRecord:
        """What goes back to the server: the trained weights (every state entry)."""
        return array_record(model.state_dict())

    def fine_tune(self, model: nn.Module, config: ConfigRecord, data: ClientData,
                  epochs: int) -> None:
        """Train every trainable weight of `model` in place for `epochs` epochs of this
        trainer's objective on the client's training split (its optimizer, lr, batches)."""
        model.train()
        if not epochs or not data.num_train:
            return
        x, y = data.x_train.to(self.device), data.y_train.to(self.device)
        self.sgd_epochs([p for p in model.parameters() if p.requires_grad], data,
                        self.round_settings(config),
                        lambda idx: self.objective(model, x[idx], y[idx]), epochs)

    def evaluated_weights(self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData,
                          state: RecordDict) -> dict[str, torch.Tensor]:
        """The weights (of `model_fn`'s model; parameters alone are enough) whose test
        accuracy this trainer reports as its own: here the received global ones. A
        personalized trainer returns its client's model; `finetuned_metrics` starts there."""
        return dict(self.load_model(arrays).state_dict())

    def finetuned_metrics(self, arrays: ArrayRecord, config: ConfigRecord, data: ClientData,
                          state: RecordDict, epochs: int) -> dict[str, float | int]:
        """`finetuned-*` metrics (`evaluation.finetune_epochs`): the evaluated model,
        fine-tuned on a copy (`fine_tune`) and scored on the client's test split. Its state
        is untouched: the fine-tune is part of evaluating, as in FedBABU."""
        weights = self.evaluated_weights(arrays, config, data, state)
        model = copy.deepcopy(self.load_model(arrays))
        model.load_state_dict({**model.state_dict(), **weights})
        self.fine_tune(model, config, data, epochs)
        logits = (predict(model, data.x_test, self.eval_batch_size) if len(data.y_test)
                  else torch.zeros(0, data.num_classes))
        return prefixed(classification_metrics(logits, data.y_test, data.class_groups),
                        FINETUNED)
