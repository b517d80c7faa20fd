"""Deployment under faults, on loopback: `scripts/deployment_faults.py` at CI size.

One run on 2 SuperNodes for 3 rounds (TLS and node authentication on, the SuperLink's
state in a file, a checkpoint every round) meets two faults: SuperNode 0 is killed
with SIGKILL while it trains in round 1 and restarted once the server logged its
failure; the SuperLink is killed with SIGKILL after the checkpoint of round 2 and
restarted. Then `fedsim resume=<run dir>` goes on on the same federation. The run's
round times and the peak of the summed RSS of every process are measured as the
script measures 20 SuperNodes (a separate run of even 4 SuperNodes for one round
would add 2 minutes here). Every wait is bounded, and every process started is
stopped by pid.
"""

from __future__ import annotations

import re

import pytest

from fedsim.deployment.federation import STOPPED_MARK
from tests.helpers import load_script

pytestmark = pytest.mark.long_running(seconds=210)  # started first: conftest.py

faults_script = load_script("deployment_faults")

NODES, ROUNDS = 2, 3


@pytest.fixture(scope="module")
def faulted(tmp_path_factory) -> dict:
    """The scenario's measurements (the federation is stopped by then)."""
    return faults_script.faults(tmp_path_factory.mktemp("faults"), nodes=NODES, rounds=ROUNDS)


def _train_replies(row: dict) -> int:
    return faults_script.train_replies(row, NODES)


# ---- a SuperNode killed mid-round, then restarted ----------------------------------------


def test_a_killed_supernode_fails_its_round_which_completes_with_the_others(faulted):
    round_1 = faulted["rows_at_failure"][1]
    assert round_1["round"] == 1
    assert _train_replies(round_1) == NODES - 1  # aggregated without the killed node
    assert round_1["train_failures"] >= 1 and round_1["skipped_rounds"] == 0
    assert len(faulted["killed_pids"]) >= 2  # the SuperNode and what ran below it
    # the server log (deployment/run.log, streamed live) names the lost node's id
    assert str(faulted["node_id"]) in faulted["failure_line"]
    assert faulted["failure_line"] in faulted["server_log"]


def test_the_restarted_supernode_rejoins_and_trains_in_the_next_round(faulted):
    assert faulted["node_id_after"] == faulted["node_id"]  # node auth: the same node
    assert faulted["trained_after_restart"] >= 1  # its log after the restart
    round_2 = faulted["rows_at_failure"][2]
    assert round_2["round"] == 2
    assert _train_replies(round_2) == NODES and round_2["train_failures"] == 0


def test_a_lost_node_is_counted_once_under_its_own_id(faulted):
    assert faulted["rows_at_failure"][1]["train_failures"] == 1
    assert "client node 1 failed" not in faulted["server_log"]


# ---- the SuperLink restarted during the run --------------------------------------------


def test_a_superlink_restart_fails_the_run_with_one_line_and_the_resume_command(faulted):
    stderr = faulted["first_stderr"].strip()
    assert faulted["first_exit_code"] == 2
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr
    assert re.fullmatch(r"fedsim: error: lost the SuperLink at 127\.0\.0\.1:\d+ during run "
                        r"\d+: it stopped or restarted, .*; once that is fixed, go on from "
                        r"round 2 with: fedsim resume=.*", stderr), stderr
    assert [row["round"] for row in faulted["rows_at_failure"]] == [0, 1, 2]
    # with its state in a file, the restarted SuperLink gets its SuperNodes back
    assert len(faulted["nodes_online_after_restart"]) == NODES


def test_resume_goes_on_from_the_checkpoint_on_the_restarted_federation(faulted):
    assert faulted["resume_exit_code"] == 0, faulted["resume_stderr"]
    assert [row["round"] for row in faulted["rows"]] == list(range(ROUNDS + 1))
    assert faulted["summary"]
    assert _train_replies(faulted["rows"][-1]) == NODES


def test_every_process_of_the_faulted_federation_is_stopped(faulted):
    assert faulted["leftover_pids"] == []
    assert faulted["pids_file"].splitlines()[-1] == STOPPED_MARK
    names = [line.split()[1] for line in faulted["pids_file"].splitlines()[:-1]]
    assert names.count("superlink") == 2 and names.count("supernode-0") >= 2  # restarts


# ---- time and memory (the script measures 20 SuperNodes for 3 rounds) --------------------


def test_round_times_and_the_peak_memory_of_every_process_are_measured(faulted):
    """The script's measurement at CI size: the summed RSS of the SuperLink, the
    SuperNodes, their SuperExecs, the ServerApp and ClientApps, and `fedsim` itself."""
    kinds = faulted["peak_by_kind"]
    assert {"flower-superlin", "flower-supernod", "flower-superexe", "flwr-serverapp"} <= \
        set(kinds), kinds
    assert faulted["processes_at_peak"] == sum(count for count, _ in kinds.values())
    assert 0 < faulted["peak_rss_bytes"] < 8 * 2**30
    assert all(row["round_time_s"] > 0 for row in faulted["rows_at_failure"][1:])
