"""Runs survive bad replies, client faults and interruptions, and stay deterministic."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import read_metrics, without_timing
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from fedsim import checkpoint
from fedsim.backends.base import SimulationGrid
from fedsim.errors import ConfigError, RunFailedError
from fedsim.experiment import run_experiment
from fedsim.fault_injection import draw_faults
from fedsim.recording import SUMMARY_FILE
from fedsim.reply_check import (
    ReplyGuard,
    model_destroyed,
    nonfinite_reply,
    reply_problem,
    same_arrays_problem,
)

pytestmark = pytest.mark.long_running(seconds=170)  # started first: conftest.py

FEDSIM = [sys.executable, "-c", "from fedsim.cli import main; main()"]
SENT = {"w": np.zeros((2, 3), np.float32), "steps": np.zeros((), np.int64)}


def _reply(arrays=None, metrics=None, extra=None) -> RecordDict:
    arrays = {"w": np.ones((2, 3), np.float32), "steps": np.ones((), np.int64)} \
        if arrays is None else arrays
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": 10, "train_loss": 0.5}
                                if metrics is None else metrics),
    })
    for name, record in (extra or {}).items():
        content[name] = record
    return content


def _problem(reply: RecordDict, sent=SENT) -> str | None:
    return reply_problem(reply, sent, "num-examples", 1000, same_arrays_problem)


# ---- hostile replies, one rule at a time ------------------------------------------------


def test_a_well_formed_reply_passes():
    assert _problem(_reply()) is None


@pytest.mark.parametrize(("reply", "says"), [
    (_reply(arrays={"w": np.full((2, 3), np.nan, np.float32), "steps": np.ones((), np.int64)}),
     "arrays['w'] must be finite"),
    (_reply(arrays={"w": np.full((2, 3), -np.inf, np.float32), "steps": np.ones((), np.int64)}),
     "arrays['w'] must be finite"),
    (_reply(arrays={"w": np.ones(6, np.float32), "steps": np.ones((), np.int64)}),
     "arrays['w'] must have shape (2, 3)"),
    (_reply(arrays={"w": np.ones((2, 3), np.int32), "steps": np.ones((), np.int64)}),
     "arrays['w'] must have a 'f'-kind dtype like the sent float32 (got int32)"),
    (_reply(arrays={"w": np.ones((2, 3), np.float32), "steps": np.ones((), np.float32)}),
     "arrays['steps'] must have a 'i'-kind dtype"),
    (_reply(arrays={"w": np.ones((2, 3), np.float32)}), "missing ['steps']"),
    (_reply(arrays={**{"w": np.ones((2, 3), np.float32), "steps": np.ones((), np.int64)},
                    "evil": np.ones(1)}), "unexpected ['evil']"),
    (_reply(metrics={"num-examples": -1}), "must be a whole number in [1, 1000]"),
    (_reply(metrics={"num-examples": 0}), "must be a whole number in [1, 1000]"),
    (_reply(metrics={"num-examples": 10**9}), "must be a whole number in [1, 1000]"),
    (_reply(metrics={"num-examples": 3.5}), "must be a whole number"),
    (_reply(metrics={"num-examples": float("nan")}), "must be a whole number"),
    (_reply(metrics={"loss": 1.0}), "metrics must include 'num-examples'"),
    (_reply(metrics={"num-examples": 5, "train_loss": float("inf")}),
     "metrics['train_loss'] must be finite"),
    (_reply(extra={"more": ArrayRecord()}), "exactly one ArrayRecord (got 2)"),
    (_reply(extra={"more": MetricRecord({"a": 1})}), "exactly one MetricRecord (got 2)"),
    (RecordDict({"arrays": ArrayRecord({"w": Array(np.ones((2, 3), np.float32))})}),
     "exactly one MetricRecord (got 0)"),
    (RecordDict({"metrics": MetricRecord({"num-examples": 3})}),
     "exactly one ArrayRecord (got 0)"),
], ids=["nan", "inf", "shape", "dtype", "integer-dtype", "missing-key", "extra-key",
        "negative-examples", "zero-examples", "absurd-examples", "fractional-examples",
        "nan-examples", "no-examples", "inf-metric", "two-arrayrecords", "two-metricrecords",
        "no-metrics", "no-arrays"])
def test_a_malformed_train_reply_is_named(reply, says):
    assert says in _problem(reply)


def test_undecodable_array_bytes_are_a_problem_not_a_crash():
    reply = _reply()
    reply["arrays"]["w"] = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray",
                                 data=b"garbage")
    assert "cannot be decoded" in _problem(reply)


def test_array_metadata_that_lies_about_its_bytes_is_caught():
    """The check reads the NPY bytes, not the Array's dtype/shape labels."""
    honest = Array(np.ones(6, np.float32))
    liar = Array(dtype="float32", shape=(2, 3), stype=honest.stype, data=honest.data)
    reply = _reply()
    reply["arrays"]["w"] = liar
    assert "arrays['w'] must have shape (2, 3) (got (6,))" in _problem(reply)


def test_arrays_read_in_place_get_the_same_verdicts_as_decoded_ones():
    from fedsim.reply_check import stored_like

    like = np.zeros((2, 3), np.float32)
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(stored_like(Array(values), like), values)
    assert stored_like(Array(values.astype(np.float64)), like) is None  # decoded instead
    assert stored_like(Array(np.asfortranarray(values)), like) is None
    fortran_nan = np.asfortranarray(np.full((2, 3), np.nan, np.float32))
    reply = _reply(arrays={"w": fortran_nan, "steps": np.ones((), np.int64)})
    assert "arrays['w'] must be finite" in _problem(reply)


def test_an_evaluate_reply_may_report_no_examples_but_never_nan_metrics():
    def problem(metrics):
        return reply_problem(RecordDict({"metrics": MetricRecord(metrics)}), None,
                             "num-examples", 1000, same_arrays_problem)

    assert problem({"num-examples": 0, "accuracy": 0.0, "num-examples-tail": 0}) is None
    assert "metrics['accuracy'] must be finite" in problem({"num-examples": 0,
                                                            "accuracy": float("nan")})
    assert "metrics['num-examples-tail'] must be a whole number in [0, 1000]" in problem(
        {"num-examples": 4, "accuracy": 0.5, "num-examples-tail": -3})


def test_a_finite_float64_upload_that_overflows_the_float32_model_is_refused():
    big = _reply(arrays={"w": np.full((2, 3), 1e300), "steps": np.ones((), np.int64)})
    assert "arrays['w'] must be finite in float32" in _problem(big)
    small = _reply(arrays={"w": np.full((2, 3), 0.5), "steps": np.ones((), np.int64)})
    assert _problem(small) is None  # float64 for float32: FedAdam's globals are float64


def test_replies_unlike_the_rest_of_the_round_are_dropped_not_fatal():
    from flwr.app import Message

    from fedsim.reply_check import alike

    def reply(node, metrics):
        msg = Message(RecordDict({"metrics": MetricRecord(metrics)}), dst_node_id=node,
                      message_type="evaluate")
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    replies = [reply(1, {"num-examples": 3, "accuracy": 0.5, "evil": 1.0}),
               reply(2, {"num-examples": 3, "accuracy": 0.5}),
               reply(3, {"num-examples": 4, "accuracy": 0.7})]
    checked = alike(replies)
    assert [r.has_error() for r in checked] == [True, False, False]
    assert "metric keys ['accuracy', 'evil', 'num-examples'] differ" in checked[0].error.reason


def test_frl_checks_rankings_not_weights():
    from fedsim.strategies.frl import FRL

    sent = {"scores": np.zeros(4, np.float32)}
    ok = ArrayRecord({"scores": Array(np.array([3, 1, 0, 2], np.int64))})
    repeated = ArrayRecord({"scores": Array(np.array([3, 3, 0, 2], np.int64))})
    assert FRL().upload_problem(ok, sent) is None
    assert "every edge id 0..3 exactly once" in FRL().upload_problem(repeated, sent)


# ---- a model destroyed by an attack is recorded, honest faults still stop the run -------


def test_model_destroyed_hand_worked():
    # a non-finite global model is destroyed, attack or not
    assert model_destroyed(global_finite=False, poisoned=False, nonfinite=[])
    # after a poisoned update: every reply of the round NaN/inf, at least one reply
    assert model_destroyed(True, True, [True, True, True])
    assert not model_destroyed(True, True, [True, False, True])  # one usable reply
    assert not model_destroyed(True, True, [])  # no reply at all: a fault, not a result
    # honest faults alone never destroy a finite model
    assert not model_destroyed(True, False, [True, True, True])


def test_a_nonfinite_reply_is_told_from_other_bad_replies():
    nan_w = {"w": np.full((2, 3), np.nan, np.float32), "steps": np.ones((), np.int64)}
    assert nonfinite_reply(_reply(arrays=nan_w))
    assert nonfinite_reply(_reply(metrics={"num-examples": 10, "train_loss": float("inf")}))
    assert nonfinite_reply(_reply(metrics={"num-examples": 10, "losses": [0.1, float("nan")]}))
    assert not nonfinite_reply(_reply())  # finite
    assert not nonfinite_reply(_reply(arrays={"w": np.ones(6, np.float32)}))  # badly shaped
    assert not nonfinite_reply(_reply(arrays={"r": np.array([3, 1, 0, 2], np.uint16)}))


class ScriptedGrid(SimulationGrid):
    """Node n uploads `uploads[n]` (NaN train loss when the upload has a NaN)."""

    def __init__(self, n: int) -> None:
        super().__init__(n, {})
        self.uploads: dict[int, np.ndarray] = {}

    def execute(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            upload = self.uploads[node].astype(np.float32)
            loss = float(np.sum(upload)) if np.isnan(upload).any() else 0.5
            reply = Message(RecordDict({
                "arrays": ArrayRecord({"w": Array(upload)}),
                "metrics": MetricRecord({"num-examples": 1, "train_loss": loss}),
            }), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _guarded_round(guard: ReplyGuard, grid: ScriptedGrid, server_round: int,
                   uploads: dict[int, list[float]], w=(1.0, 2.0)) -> None:
    """One FedAvg-like round: send w to the nodes of `uploads`, average the valid replies."""
    grid.uploads = {node: np.array(values) for node, values in uploads.items()}
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.array(w, np.float32))}),
                          "config": ConfigRecord({"server-round": server_round})})
    replies = list(guard.send_and_receive(
        [grid.create_message(content, MessageType.TRAIN, node, "1") for node in uploads]))
    valid = [r.content["arrays"]["w"].numpy() for r in replies if not r.has_error()]
    with np.errstate(over="ignore"):
        arrays = ArrayRecord({"w": Array(np.mean(valid, axis=0))}) if valid else None
    guard.after_train(server_round, replies, arrays, None)


NAN = [float("nan"), float("nan")]


def test_guard_records_a_model_destroyed_after_a_malicious_update(caplog):
    """Node 1 is malicious: its scaled upload is applied in round 1, then every reply is
    NaN; the guard records it once and never stops the run (max_skipped_rounds=2)."""
    grid = ScriptedGrid(4)
    guard = ReplyGuard(grid, "num-examples", 100, max_skipped_rounds=2, malicious=frozenset({1}))
    _guarded_round(guard, grid, 1, {1: [1e5, 2e5], 2: [1.1, 2.1]})  # applied, malicious in it
    assert guard.poisoned and not guard.model_destroyed
    assert guard.take_counts() == {"skipped_rounds": 0}
    with caplog.at_level(logging.DEBUG, logger="fedsim"):
        for server_round in range(2, 7):
            _guarded_round(guard, grid, server_round, {2: NAN, 3: NAN})
            assert guard.take_counts() == {"skipped_rounds": 1, "model_destroyed": True}
    assert guard.destroyed_round == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2  # round 2's skip, then one line for the rest of the run
    assert warnings[0].startswith("only 0 valid train replies")
    assert warnings[1].startswith("round 2: the global model is destroyed (every train reply")


def test_honest_nan_replies_still_stop_the_run():
    """The same NaN rounds without a malicious upload applied: a fault, the run stops."""
    for malicious, first in ((frozenset(), {1: [1.0, 2.0], 2: [1.1, 2.1]}),
                             (frozenset({1}), {2: [1.0, 2.0], 3: [1.1, 2.1]})):
        grid = ScriptedGrid(4)
        guard = ReplyGuard(grid, "num-examples", 100, max_skipped_rounds=2,
                           malicious=malicious)
        _guarded_round(guard, grid, 1, first)
        _guarded_round(guard, grid, 2, {2: NAN, 3: NAN})
        with pytest.raises(RunFailedError, match="round 3: 2 rounds in a row applied no"):
            _guarded_round(guard, grid, 3, {2: NAN, 3: NAN})
        assert not guard.model_destroyed


def test_a_round_with_one_usable_reply_does_not_destroy_the_model():
    grid = ScriptedGrid(4)
    guard = ReplyGuard(grid, "num-examples", 100, malicious=frozenset({1}))
    _guarded_round(guard, grid, 1, {1: [1e5, 2e5], 2: [1.1, 2.1]})
    _guarded_round(guard, grid, 2, {2: NAN, 3: [1.0, 2.0, 3.0]})  # NaN + badly shaped
    assert not guard.model_destroyed


def test_a_nonfinite_global_model_is_destroyed_without_an_attack():
    grid = ScriptedGrid(4)
    guard = ReplyGuard(grid, "num-examples", 100, max_skipped_rounds=1)
    _guarded_round(guard, grid, 1, {1: [3e38, 1.0], 2: [3e38, 1.0]})  # the mean overflows
    assert guard.destroyed_round == 1
    for server_round in (2, 3):  # skipped rounds no longer stop the run
        _guarded_round(guard, grid, server_round, {1: NAN})


# ---- hostile and failing clients in whole runs ------------------------------------------

HOSTILE_RUN = ["num_clients=14", "clients_per_round=14", "num_rounds=3",
               "evaluation.clients_per_round=3", "partition=iid"]
SERVER_KEYS = ("server/accuracy", "server/loss", "train/train_loss")


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedmedian", "stale", "krum"])
def test_hostile_replies_are_dropped_like_failed_clients(tiny_cfg, strategy, caplog):
    """Nodes 1-11 each break their reply another way; the run equals one where they crash."""
    extra = ["strategy.num_malicious_nodes=1"] if strategy == "krum" else []
    hostile = tiny_cfg(*HOSTILE_RUN, f"strategy={strategy}", *extra,
                       "client._target_=helpers.HostileTrainer")
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        run_experiment(hostile)
    crashing = tiny_cfg(*HOSTILE_RUN, f"strategy={strategy}", *extra,
                        "client._target_=helpers.CrashingNodesTrainer")
    run_experiment(crashing)
    rows, expected = read_metrics(hostile.output_dir), read_metrics(crashing.output_dir)
    assert [r["train_failures"] for r in rows[1:]] == [11, 11, 11]
    for row, want in zip(rows, expected, strict=True):
        assert {k: row.get(k) for k in SERVER_KEYS} == {k: want.get(k) for k in SERVER_KEYS}
    assert np.isfinite(rows[-1]["server/loss"])
    assert "client node 1 failed (train): reply rejected by the server: arrays[" in caplog.text


@pytest.mark.parametrize("method", [
    [],
    ["strategy=fedld", "client=fedld"],
    ["strategy=fedbuff", "strategy.concurrency=4", "strategy.buffer_size=2"],
    ["strategy=stale", "devices=fixed", "devices.delay=1", "devices.fraction=0.5"],
    ["strategy=frl", "client=frl", "model=supermask_mlp"],
], ids=["fedavg", "fedld", "fedbuff-async", "stale-sync", "frl-rankings"])
def test_injected_nan_uploads_never_reach_the_model(tiny_cfg, method):
    cfg = tiny_cfg("faults.nan_prob=0.4", "num_rounds=4", *method)
    summary = run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    assert summary["train_failures"] > 0
    assert all(np.isfinite(r["server/loss"]) for r in rows)


def test_injected_faults_depend_only_on_seed_node_and_round():
    from omegaconf import OmegaConf

    faults = OmegaConf.create({"crash_prob": 0.3, "nan_prob": 0.3, "hang_prob": 0.5,
                               "hang_s": 2.0})
    draws = [draw_faults(faults, 0, p, r) for p in range(20) for r in range(1, 6)]
    assert draws == [draw_faults(faults, 0, p, r) for p in range(20) for r in range(1, 6)]
    assert draws != [draw_faults(faults, 1, p, r) for p in range(20) for r in range(1, 6)]
    crash = np.mean([d.crash for d in draws])
    nan = np.mean([d.nan for d in draws])
    assert 0.15 < crash < 0.45 and 0.15 < nan < 0.45
    assert not any(d.crash and d.nan for d in draws)
    assert {d.hang_s for d in draws} == {0.0, 2.0}


def test_an_async_round_is_skipped_only_when_it_applies_nothing(tiny_cfg):
    """A failed mid-round replacement client does not make a round 'skipped'."""
    cfg = tiny_cfg("strategy=fedbuff", "strategy.concurrency=4", "strategy.buffer_size=3",
                   "faults.crash_prob=0.5", "num_rounds=6", "faults.max_skipped_rounds=6")
    run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)[1:]
    assert any("train/train_loss" in r for r in rows)
    for row in rows:
        assert row["skipped_rounds"] == ("train/train_loss" not in row)


def test_too_few_replies_skip_the_round_and_keep_the_model(tiny_cfg):
    cfg = tiny_cfg("faults.crash_prob=0.5", "faults.min_replies=2", "num_rounds=6",
                   "faults.max_skipped_rounds=6")
    summary = run_experiment(cfg)
    rows = read_metrics(cfg.output_dir)
    skipped = [r["round"] for r in rows[1:] if r["skipped_rounds"]]
    assert skipped and summary["skipped_rounds"] == len(skipped) < 6
    for r in skipped:
        assert "train/train_loss" not in rows[r]
        assert rows[r]["server/accuracy"] == rows[r - 1]["server/accuracy"]  # model kept


def test_a_run_whose_clients_all_fail_stops_with_a_clear_error(tiny_cfg):
    cfg = tiny_cfg("faults.crash_prob=1.0", "num_rounds=5", "faults.max_skipped_rounds=2",
                   "checkpoint.every=1")
    with pytest.raises(RunFailedError, match=r"round 2: 2 rounds in a row applied no update "
                                             r"\(fewer than faults.min_replies=1 valid"):
        run_experiment(cfg)
    run_dir = Path(cfg.output_dir)
    assert not (run_dir / SUMMARY_FILE).exists()
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1]
    assert checkpoint.load(run_dir).server_round == 1  # resumable once clients are fixed


def test_the_cli_says_why_a_failing_run_stopped(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [*FEDSIM, "logger=none", "progress=false", "num_rounds=4", "num_clients=4",
         "clients_per_round=2", "evaluation.clients_per_round=2", "model=mlp",
         "faults.crash_prob=1.0", f"output_dir={out}"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "fedsim: error: round 3: 3 rounds in a row applied no update" in done.stderr
    assert "failed (train): InjectedFaultError: injected crash (faults.crash_prob) in round 1 " \
        "(at fault_injection.py:" in done.stdout  # with node ids, the cause and its frame
    assert "the run had no checkpoint yet" in done.stderr  # checkpoint.every=5 > 3 rounds
    assert "resume=" not in done.stderr
    assert "run finished" not in done.stderr + done.stdout


def test_a_late_reply_is_dropped_and_named(tiny_cfg, caplog):
    cfg = tiny_cfg("faults.hang_prob=0.5", "faults.hang_s=0.4", "faults.timeout_s=0.3",
                   "num_rounds=3")
    with caplog.at_level(logging.WARNING, logger="fedsim"):
        summary = run_experiment(cfg)
    hung = [(p, r) for r in range(1, 4) for p in range(6)
            if draw_faults(cfg.faults, cfg.seed, p, r).hang_s]
    assert hung and summary["train_failures"] > 0
    assert "sent no train reply before the round's deadline (faults.timeout_s)" in caplog.text


def test_calls_without_a_timeout_get_the_round_deadline(tiny_cfg):
    """An asynchronous strategy's mid-round starts call the grid without a timeout."""
    from fedsim.backends.base import GridWrapper
    from fedsim.datasets.federated import build_federated_data
    from fedsim.runtime import build_strategy
    from fedsim.server import guarded

    class TimeoutSpy(GridWrapper):
        timeouts: list = []

        def send_and_receive(self, messages, *, timeout=None):
            self.timeouts.append(timeout)
            return []

    cfg = tiny_cfg("faults.timeout_s=7.5")
    guard = guarded(cfg, build_strategy(cfg), TimeoutSpy(None), build_federated_data(cfg))
    guard.send_and_receive([])
    guard.send_and_receive([], timeout=3.0)
    assert TimeoutSpy.timeouts == [7.5, 3.0]


def test_min_replies_and_kill_round_are_checked_before_any_work(tiny_cfg):
    from fedsim.runtime import preflight

    for bad, field in ((["faults.min_replies=4"], "faults.min_replies"),
                       (["faults.kill_worker_round=1"], "backend"),
                       (["faults.crash_prob=0.7", "faults.nan_prob=0.5"], "faults.nan_prob"),
                       (["strategy=fedbuff", "faults.min_replies=2"], "faults.min_replies"),
                       (["faults.timeout_s=0"], "faults.timeout_s"),
                       (["faults.timeout_s=inf"], "faults.timeout_s"),
                       (["faults.hang_prob=0.5"], "faults.hang_s"),
                       (["faults.hang_prob=0.5", "faults.hang_s=1e9"], r"faults.hang_s.*3600"),
                       (["faults.max_num_examples=10"], "faults.max_num_examples")):
        cfg = tiny_cfg(*bad)
        with pytest.raises(ConfigError, match=field):
            preflight(cfg)
        assert not Path(cfg.output_dir).exists()


# ---- checkpoints and resume -------------------------------------------------------------


class Interrupted(BaseException):
    """Stands in for a kill between two rounds."""


def _interrupted_run(cfg, stop_round: int, monkeypatch) -> None:
    from fedsim.recording import RunRecorder

    end_of_round = RunRecorder.end_of_round

    def stop(self, server_round, arrays):
        if server_round == stop_round:
            raise Interrupted
        return end_of_round(self, server_round, arrays)

    with monkeypatch.context() as patch:
        patch.setattr(RunRecorder, "end_of_round", stop)
        with pytest.raises(Interrupted):
            run_experiment(cfg)


RESUMABLE = {
    "fedavg": [],
    "fedadam-server-moments": ["strategy=fedadam"],
    "fedld-history": ["strategy=fedld", "client=fedld"],
    "scaffold-server-and-client-variates": ["strategy=scaffold", "client=scaffold"],
    "ditto-personal-models": ["method=ditto"],
    "fednova": ["method=fednova"],
    "fedper-personal-heads": ["method=fedper"],
    "moon-previous-models": ["method=moon"],
    "feddyn-server-and-client-states": ["method=feddyn"],
    "apfl-local-models-and-alphas": ["method=apfl"],
    "pfedme-personalized-models": ["method=pfedme", "client.personal_steps=2"],
    "frl-scores-and-colluders-under-attack": ["strategy=frl", "client=frl",
                                              "model=supermask_mlp", "num_clients=12",
                                              "attack=rank_reversal", "attack.fraction=0.4",
                                              "attack.colluders=3"],
    "fedloge-client-heads": ["strategy=fedloge", "client=fedloge", "client.etf_steps=50",
                             "data.imbalance_factor=0.1"],
    "fedbuff-clock-and-buffer": ["strategy=fedbuff", "strategy.concurrency=4",
                                 "strategy.buffer_size=2", "devices=fixed", "devices.delay=2",
                                 "devices.fraction=0.5"],
    "dc-asgd-stale-versions": ["strategy=dc_asgd", "devices=fixed", "devices.delay=2",
                               "devices.fraction=0.5"],
    "faults": ["faults.crash_prob=0.2", "faults.nan_prob=0.2"],
    "central-dp-adaptive-norm-and-accountant": ["privacy=central_adaptive", "model=mlp",
                                                "privacy.clipped_count_stddev=1.0"],
    "local-dp-per-client-accountant": ["privacy=local", "model=mlp"],
    "staleness-inversion-estimates": ["strategy=staleness_inversion", "devices=fixed",
                                      "devices.delay=2", "devices.fraction=0.5",
                                      "strategy.iterations=5", "strategy.dummy_size=8",
                                      "client.batch_size=512"],
}


def _untimed_row(row: dict) -> dict:
    """A metrics row without wall-clock values (round times, inversion seconds)."""
    return {k: v for k, v in row.items() if "seconds" not in k and not k.endswith("_time_s")}


def _untimed_lines(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [_untimed_row(json.loads(line)) for line in lines]


def _untimed(run_dir) -> list[dict]:
    return [_untimed_row(row) for row in read_metrics(run_dir)]


@pytest.mark.parametrize("method", list(RESUMABLE.values()), ids=list(RESUMABLE))
def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tiny_cfg, method, monkeypatch):
    run = ["num_rounds=7", "checkpoint.every=2", "num_clients=8", "clients_per_round=4",
           "evaluation.clients_per_round=2", *method]
    whole = tiny_cfg(*run)
    run_experiment(whole)
    broken = tiny_cfg(*run)
    _interrupted_run(broken, stop_round=6, monkeypatch=monkeypatch)  # rounds 5 redone
    run_dir = Path(broken.output_dir)
    assert checkpoint.load(run_dir).server_round == 4
    summary = run_experiment(checkpoint.resumed_config(str(run_dir)))
    assert _untimed(run_dir) == _untimed(whole.output_dir)
    updates = [Path(d) / "updates.jsonl" for d in (run_dir, whole.output_dir)]
    assert [_untimed_lines(u) for u in updates] == [_untimed_lines(updates[1])] * 2
    expected = json.loads((Path(whole.output_dir) / SUMMARY_FILE).read_text())
    assert _untimed_row(summary["final"]) == _untimed_row(expected["final"])
    for key in ("best_server_accuracy", "train_failures", "bytes_up", "skipped_rounds"):
        assert summary[key] == expected[key]
    kept = (run_dir / "metrics.jsonl.resumed1").read_text().splitlines()
    assert [json.loads(line)["round"] for line in kept] == [0, 1, 2, 3, 4, 5]  # nothing lost
    assert not (run_dir / checkpoint.CHECKPOINT_FILE).exists()  # finished: no checkpoint


def test_a_run_killed_with_sigkill_resumes_to_the_same_end(tiny_cfg, tmp_path):
    """The real thing: a `fedsim` process killed mid-run, then `fedsim resume=<dir>`."""
    args = ["logger=none", "progress=false", "num_rounds=6", "num_clients=6",
            "clients_per_round=3", "evaluation.clients_per_round=2", "model=mlp",
            "checkpoint.every=2", "client.local_epochs=3"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    cli = FEDSIM
    subprocess.run([*cli, *args, f"output_dir={whole}"], check=True, capture_output=True,
                   timeout=300)
    proc = subprocess.Popen([*cli, *args, f"output_dir={broken}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = broken / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (broken / SUMMARY_FILE).exists()
    subprocess.run([*cli, f"resume={broken}", "progress=false"], check=True,
                   capture_output=True, timeout=300)
    assert without_timing(read_metrics(broken)) == without_timing(read_metrics(whole))


def test_resume_refuses_a_finished_run_a_run_without_checkpoint_and_other_settings(tiny_cfg):
    finished = tiny_cfg("checkpoint.every=1", "num_rounds=2")
    run_experiment(finished)
    before = (Path(finished.output_dir) / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="is finished"):
        run_experiment(checkpoint.resumed_config(finished.output_dir))
    assert (Path(finished.output_dir) / "metrics.jsonl").read_bytes() == before
    with pytest.raises(ConfigError, match="only progress, device"):
        checkpoint.resumed_config(finished.output_dir, ["num_rounds=9"])
    never = tiny_cfg("checkpoint.every=0", "num_rounds=3")
    with pytest.raises(Exception):  # noqa: B017 - stop it mid-way without a checkpoint
        run_experiment(tiny_cfg("checkpoint.every=0", "faults.crash_prob=1.0",
                                "faults.max_skipped_rounds=1", f"output_dir={never.output_dir}"))
    with pytest.raises(ConfigError, match=f"has no {checkpoint.CHECKPOINT_FILE}"):
        run_experiment(checkpoint.resumed_config(never.output_dir))
    with pytest.raises(ConfigError, match="fedsim run directory"):
        checkpoint.resumed_config(str(Path(never.output_dir) / "nowhere"))


def test_a_hand_made_resume_config_must_be_the_stored_experiment(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("num_rounds=4", "checkpoint.every=2")
    _interrupted_run(cfg, stop_round=3, monkeypatch=monkeypatch)
    other = tiny_cfg("num_rounds=4", "checkpoint.every=2", "num_clients=9",
                     f"resume={cfg.output_dir}", f"output_dir={cfg.output_dir}")
    before = (Path(cfg.output_dir) / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="resume: num_clients differs from the stored config"):
        run_experiment(other)
    assert (Path(cfg.output_dir) / "metrics.jsonl").read_bytes() == before


def test_resume_may_change_how_a_run_executes(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("num_rounds=4", "checkpoint.every=2")
    _interrupted_run(cfg, stop_round=3, monkeypatch=monkeypatch)
    resumed = checkpoint.resumed_config(cfg.output_dir, ["progress=true", "torch_threads=2"])
    assert resumed.progress is True and resumed.torch_threads == 2
    assert resumed.output_dir == resumed.resume == cfg.output_dir


# ---- determinism -------------------------------------------------------------------------


def test_same_seed_same_faults_same_run(tiny_cfg):
    overrides = ["faults.crash_prob=0.3", "faults.nan_prob=0.2", "num_rounds=4"]
    first, second = tiny_cfg(*overrides), tiny_cfg(*overrides)
    run_experiment(first)
    run_experiment(second)
    rows = without_timing(read_metrics(first.output_dir))
    assert rows == without_timing(read_metrics(second.output_dir))
    assert sum(r.get("train_failures", 0) for r in rows) > 0


def test_a_strategy_from_elsewhere_resumes_when_it_loads_its_own_state(tiny_cfg, monkeypatch):
    """fedsim assigns no attribute of another class: a stateful strategy without
    `load_checkpoint_state` is refused on resume (one line, nothing lost); one with it
    resumes to the uninterrupted run's end, its state included."""
    run = ["num_rounds=4", "checkpoint.every=2"]
    counting = "strategy._target_=helpers.CountingFedAvg"
    broken = tiny_cfg(*run, counting)
    _interrupted_run(broken, stop_round=3, monkeypatch=monkeypatch)
    before = (Path(broken.output_dir) / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"strategy must define load_checkpoint_state\(state\)"
                                          r".*CountingFedAvg changed \['replies_seen'\]"):
        run_experiment(checkpoint.resumed_config(broken.output_dir))
    assert (Path(broken.output_dir) / "metrics.jsonl").read_bytes() == before

    loading = "strategy._target_=helpers.CheckpointedCountingFedAvg"
    whole = tiny_cfg(*run, loading)
    run_experiment(whole)
    broken = tiny_cfg(*run, loading)
    _interrupted_run(broken, stop_round=3, monkeypatch=monkeypatch)
    run_experiment(checkpoint.resumed_config(broken.output_dir))
    resumed, expected = _untimed(broken.output_dir), _untimed(whole.output_dir)
    assert resumed == expected
    assert [row.get("train/replies_seen") for row in resumed][-1] == 4 * 3
