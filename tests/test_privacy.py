"""Differential privacy: accounting against two libraries, the noise's std, clipping's
bound, DP-SGD's steps, the config checks, and whole runs under each option."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from opacus.accountants import RDPAccountant

from fedsim.client_app import clipped
from fedsim.errors import ConfigError, MessageError
from fedsim.experiment import run_experiment
from fedsim.privacy.accounting import Release, epsilon, merge, release_event
from fedsim.privacy.central import (
    DP_WEIGHT,
    ServerSideAdaptiveClipping,
    ServerSideFixedClipping,
)
from fedsim.privacy.dp_sgd import DPSGD, poisson_batch
from fedsim.privacy.local import LocalAccounting, reported_release
from fedsim.privacy.options import CLIP_MOD
from fedsim.runtime import preflight
from tests.conftest import read_metrics

DELTA = 1e-5
#: a two-sided normal quantile for a false-alarm rate of 1e-6 per statistical check
Z_FALSE_ALARM = 4.89

# ---- accounting ----------------------------------------------------------------------


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.1, 1000), (0.2, 1.0, 30), (0.5, 2.0, 7),
                                             (1.0, 3.0, 10)])
def test_epsilon_is_dp_accountings_rdp_accountant(q, sigma, steps):
    """Same library, composed through its public accountant: the same orders, the same
    arithmetic, so the same float."""
    accountant = RdpAccountant()
    accountant.compose(release_event(Release(q, sigma, steps)))
    assert epsilon([Release(q, sigma, steps)], DELTA) == accountant.get_epsilon(DELTA)


def test_epsilon_of_abadis_mnist_setting_matches_opacus():
    """DP-SGD on MNIST (Abadi et al. 2016): batch 256 of 60,000, sigma 1.1, 60 epochs.
    Opacus's RDP accountant is another implementation with other orders: 1% apart at most."""
    q, sigma = 256 / 60_000, 1.1
    steps = 60 * 60_000 // 256
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    ours = epsilon([Release(q, sigma, steps)], DELTA)
    assert ours == pytest.approx(opacus.get_epsilon(DELTA), rel=0.01)
    assert 2.4 < ours < 2.8  # the RDP figure for this setting (2.6); the moments accountant's 2.55


def test_epsilon_grows_with_steps_and_falls_with_noise():
    values = [epsilon([Release(0.1, z, n)], DELTA) for z, n in ((1.0, 10), (1.0, 20), (2.0, 20))]
    assert values[0] < values[1] and values[2] < values[1]
    assert epsilon([], DELTA) == 0.0
    assert epsilon([Release(0.1, 0.0, 1)], DELTA) == math.inf


def test_merge_adds_the_counts_of_equal_settings():
    merged = merge([Release(0.1, 1.0, 3), Release(0.2, 1.0, 1), Release(0.1, 1.0, 4)])
    assert sorted(merged, key=lambda r: r.sample_rate) == [Release(0.1, 1.0, 7),
                                                           Release(0.2, 1.0, 1)]


# ---- central DP: noise and clipping -------------------------------------------------


def _train(strategy, current: np.ndarray, uploads: list[np.ndarray | None], weights=None):
    """One configure/aggregate round of `strategy` with replies carrying `uploads` (None:
    an error reply)."""
    arrays = ArrayRecord({"w": Array(current)})

    class Grid:
        def get_node_ids(self):
            return list(range(1, len(uploads) + 1))

    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), Grid()))
    replies = []
    for msg, upload, weight in zip(messages, uploads, weights or [1] * len(uploads),
                                   strict=True):
        if upload is None:
            replies.append(Message(Error(code=0, reason="client broke"), reply_to=msg))
            continue
        content = RecordDict({"arrays": ArrayRecord({"w": Array(upload)}),
                              "metrics": MetricRecord({"num-examples": weight})})
        replies.append(Message(content, reply_to=msg))
    return replies, *strategy.aggregate_train(1, replies)


def _fedavg(m: int) -> FedAvg:
    return FedAvg(fraction_train=1.0, min_train_nodes=m, min_available_nodes=m,
                  weighted_by_key=DP_WEIGHT)


def test_central_noise_has_the_configured_std():
    """Clients that all send the same small update e (below the bound): the new global is
    the old plus e plus the noise, N(0, (z * C / m)^2) in each of d coordinates. The
    sample variance over d draws is within Z_FALSE_ALARM standard errors of its
    expectation (false alarm 1e-6). (An exactly zero update would stop Flower's clipping
    with a division by zero; `CentralDP.check` refuses client.lr=0 for that reason.)"""
    d, m, z, clip = 50_000, 4, 1.5, 2.0
    strategy = ServerSideFixedClipping(_fedavg(m), z, clip, m, population=20, delta=DELTA,
                                       seed=3)
    current = np.zeros(d, np.float64)
    step = np.full(d, 1e-3 / math.sqrt(d))
    _, arrays, metrics = _train(strategy, current, [current + step for _ in range(m)])
    noise = arrays["w"].numpy() - step
    std = z * clip / m
    assert abs(noise.var() / std**2 - 1) < Z_FALSE_ALARM * math.sqrt(2 / (d - 1))
    assert abs(noise.mean()) < Z_FALSE_ALARM * std / math.sqrt(d)
    assert metrics["privacy/epsilon"] == epsilon([Release(m / 20, z, 1)], DELTA)


def test_central_noise_is_scaled_to_the_updates_averaged_and_their_norm():
    """One of 4 clients fails: the round still applies (Flower's wrapper would drop it) and
    the mean of the 3 others gets noise z * C / 3. Adaptive clipping moves the norm after
    clipping; the noise follows the norm the updates were clipped to."""
    d, m, z = 40_000, 4, 1.0
    current = np.zeros(d)
    step = np.full(d, 1e-3 / math.sqrt(d))
    fixed = ServerSideFixedClipping(_fedavg(m), z, 2.0, m, population=8, delta=DELTA, seed=5)
    _, arrays, _ = _train(fixed, current, [current + step] * 3 + [None])
    noise = arrays["w"].numpy() - step
    assert abs(noise.var() / (z * 2.0 / 3) ** 2 - 1) < Z_FALSE_ALARM * math.sqrt(2 / (d - 1))
    adaptive = ServerSideAdaptiveClipping(_fedavg(m), z, m, 0.5, 0.5, 0.2, 1.0,
                                          population=8, delta=DELTA, seed=5)
    _, arrays, metrics = _train(adaptive, current, [current + step] * m)
    assert adaptive.clipping_norm != 0.5  # moved after this round's clipping
    std = adaptive.noise_multiplier * 0.5 / m  # Flower's share of the noise for the updates
    noise = arrays["w"].numpy() - step
    assert abs(noise.var() / std**2 - 1) < Z_FALSE_ALARM * math.sqrt(2 / (d - 1))
    assert metrics["privacy/clipping-norm"] == 0.5


def test_central_clipping_bounds_every_update_and_weighs_clients_alike():
    """Updates of norm 10 and 0.5 with a bound of 1: the first is scaled to norm 1, the
    second kept; the mean is uniform although the clients report 1 and 99 examples."""
    strategy = ServerSideFixedClipping(_fedavg(2), 1e-12, 1.0, 2, population=2, delta=DELTA,
                                       seed=0)
    current = np.ones(4)
    big, small = current + np.array([10.0, 0, 0, 0]), current + np.array([0, 0.5, 0, 0])
    replies, arrays, _ = _train(strategy, current, [big, small], weights=[1, 99])
    sent = [r.content["arrays"]["w"].numpy() - current for r in replies]
    assert [np.linalg.norm(u) for u in sent] == pytest.approx([1.0, 0.5])
    assert arrays["w"].numpy() - current == pytest.approx([0.5, 0.25, 0, 0], abs=1e-9)


def test_the_client_side_mod_clips_before_upload():
    """`clipped` runs Flower's fixedclipping_mod when the train config names it."""
    sent = ArrayRecord({"w": Array(np.zeros(3))})
    msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord(
        {"clipping_norm": 1.0, CLIP_MOD: "fixed"})}), dst_node_id=1, message_type="train")

    def train(message, context):
        arrays = ArrayRecord({"w": Array(np.array([3.0, 4.0, 0.0]))})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
            {"num-examples": 1})}), reply_to=message)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = clipped(msg, context, train)
    assert reply.content["arrays"]["w"].numpy() == pytest.approx([0.6, 0.8, 0.0])


# ---- local DP: DP-SGD --------------------------------------------------------------


def _linear(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(20, 3)


def test_dp_sgd_moves_the_weights_by_at_most_lr_times_the_clip():
    """All 8 samples in the step (batch 8 of 8): the update is lr * (sum of clipped
    per-sample gradients + noise) / 8; with negligible noise its norm is <= lr * C."""
    model, x = _linear(), 100 * torch.randn(8, 20)
    y = torch.randint(0, 3, (8,))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    loss, metrics = DPSGD(1e-9, 0.5).train(
        model, torch.optim.SGD(model.parameters(), lr=1.0), x, y, batch_size=8, epochs=1,
        generator=torch.Generator().manual_seed(0),
        batch_loss=torch.nn.functional.cross_entropy)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < float((after - before).norm()) <= 0.5 * (1 + 1e-6)
    assert metrics == {"dp-sample-rate": 1.0, "dp-steps": 1, "dp-noise": 1e-9}
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks removed


def test_dp_sgd_noise_has_the_configured_std():
    """A loss with zero gradient: each step moves every weight by lr * N(0, (z C)^2) / B.
    One step over d = 20*3+3 weights is too few draws; 400 steps of 63 give 25,200."""
    model = _linear()
    x, y = torch.randn(40, 20), torch.randint(0, 3, (40,))
    z, clip, batch = 2.0, 0.5, 10
    steps = []
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):  # 100 calls of 4 steps (40 / 10)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        DPSGD(z, clip).train(model, optimizer, x, y, batch_size=batch, epochs=1,
                             generator=generator, batch_loss=lambda logits, _: logits.sum() * 0)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        steps.append((after - before).numpy())
    moves = np.concatenate(steps)  # each the sum of 4 independent steps
    std = math.sqrt(4) * z * clip / batch
    n = moves.size
    assert abs(moves.var() / std**2 - 1) < Z_FALSE_ALARM * math.sqrt(2 / (n - 1))


def test_poisson_batches_have_the_expected_size():
    generator = torch.Generator().manual_seed(0)
    sizes = [len(poisson_batch(1000, 0.05, generator)) for _ in range(400)]
    # mean of 400 Binomial(1000, 0.05): 50 +- 4.89 * sqrt(47.5 / 400)
    assert abs(np.mean(sizes) - 50) < Z_FALSE_ALARM * math.sqrt(47.5 / 400)


def test_a_reply_without_dp_sgd_metrics_is_refused_by_the_accountant():
    with pytest.raises(MessageError, match="dp-sample-rate"):
        reported_release({"num-examples": 3}, node=4)
    assert reported_release({"dp-sample-rate": 0.5, "dp-noise": 1.0, "dp-steps": 6}, 4) \
        == Release(0.5, 1.0, 6)


def test_local_accounting_reports_the_worst_clients_epsilon():
    accounting = LocalAccounting(FedAvg(), delta=DELTA)
    accounting.histories = {"1": [[0.1, 1.0, 50]], "2": [[0.5, 1.0, 50]]}
    worst = accounting.client_epsilon(2)
    assert worst == epsilon([Release(0.5, 1.0, 50)], DELTA) > accounting.client_epsilon(1)


# ---- config checks: one line naming the field, before any work ---------------------------


@pytest.mark.parametrize("overrides, field", [
    (["privacy=central_fixed", "strategy=fedmedian"], "strategy"),
    (["privacy=central_fixed", "method=scaffold"], "strategy"),
    (["privacy=central_fixed", "strategy=fedavg", "client=fedld"], "client"),
    (["privacy=central_fixed", "+strategy.weighted_by_key=num-examples"],
     "strategy.weighted_by_key"),
    (["privacy=central_fixed", "privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
    (["privacy=central_fixed", "privacy.clip_on=both"], "privacy.clip_on"),
    (["privacy=central_fixed", "client.lr=0"], "client.lr"),
    (["privacy=central_adaptive", "privacy.clipped_count_stddev=0.4"],
     "privacy.clipped_count_stddev"),
    (["privacy=central_fixed", "strategy=fedavgm"], "strategy"),
    (["privacy=central_fixed", "strategy=fedadam"], "strategy"),
    (["privacy=central_fixed", "strategy=fedloge", "client=fedloge"], "strategy"),
    (["privacy=central_fixed", "dataset=digits", "model=resnet18", "model.width=8"], "model"),
    (["privacy=local", "strategy=fedprox"], "strategy.proximal_mu"),
    (["privacy=local", "evaluation.finetune_epochs=1"], "evaluation.finetune_epochs"),
    (["privacy=local", "method=moon"], "client"),
    (["privacy=local", "client=noprop", "model=noprop"], "client"),
    (["privacy=local", "client.proximal_mu=0.1"], "client.proximal_mu"),
    (["privacy=local", "privacy.max_grad_norm=-1"], "privacy.max_grad_norm"),
    (["privacy=local", "privacy.delta=1.5"], "privacy.delta"),
    (["privacy=local", "dataset=digits", "model=resnet18", "model.width=8"], "model"),
])
def test_combinations_that_cannot_work_are_refused_naming_the_field(tiny_cfg, overrides,
                                                                    field):
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ConfigError, match=rf"^{field}\b") as err:
        preflight(cfg)
    assert "\n" not in str(err.value)


# ---- whole runs ------------------------------------------------------------------------


@pytest.mark.parametrize("option", [["privacy=central_fixed"],
                                    ["privacy=central_fixed", "privacy.clip_on=client"],
                                    ["privacy=central_adaptive",
                                     "privacy.clipped_count_stddev=1.0"]])
def test_a_central_dp_run_reports_the_epsilon_of_its_rounds(tiny_cfg, option):
    cfg = tiny_cfg(*option, "num_rounds=3")
    summary = run_experiment(cfg)
    spent = [r["train/privacy/epsilon"] for r in read_metrics(cfg.output_dir) if r["round"]]
    q = cfg.clients_per_round / cfg.num_clients
    assert spent == [epsilon([Release(q, cfg.privacy.noise_multiplier, n)], DELTA)
                     for n in (1, 2, 3)]
    assert summary["final"]["train/privacy/epsilon"] == spent[-1]


def test_server_and_client_side_clipping_give_the_same_run(tiny_cfg):
    """The same clipping on either side, the same seeded noise: equal up to float32
    rounding (the mod clips the client's float32 arrays, the server clips them too but
    the two compute the update's norm in different orders)."""
    server = tiny_cfg("privacy=central_fixed")
    client = tiny_cfg("privacy=central_fixed", "privacy.clip_on=client")
    run_experiment(server)
    run_experiment(client)
    for a, b in zip(read_metrics(server.output_dir), read_metrics(client.output_dir),
                    strict=True):
        assert a.get("server/loss") == pytest.approx(b.get("server/loss"), rel=1e-5)


def test_a_local_dp_run_accounts_every_client_and_repeats_itself(tiny_cfg):
    first, second = tiny_cfg("privacy=local"), tiny_cfg("privacy=local")
    run_experiment(first)
    run_experiment(second)
    rows = read_metrics(first.output_dir)
    spent = [r["train/privacy/epsilon"] for r in rows if r["round"]]
    assert 0 < spent[0] <= spent[1]
    assert all(r["train/privacy/epsilon-mean"] <= r["train/privacy/epsilon"]
               for r in rows if r["round"])
    strip = [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in rows]
    again = [{k: v for k, v in r.items() if not k.endswith("_time_s")}
             for r in read_metrics(second.output_dir)]
    assert strip == again  # same path, same seed: exactly
