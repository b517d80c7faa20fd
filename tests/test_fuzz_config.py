"""A fuzz test of the config check (issue #25).

Seeded random overrides (wrong types, signs, NaN and infinities, huge and tiny
values, unknown keys and options, other group options) on a tiny config. Each case
either runs one round to completion, or is refused with one line: a `FedsimError`
(exit 2 from the CLI) or a command-line mistake that `fedsim.cli.explain` words as
one line. Never another exception, never a hang: each case has `CASE_LIMIT_S` to
finish a round, and a valid long run (num_rounds=1000000) is stopped once it has.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fedsim.cli import explain
from fedsim.config import CONF_DIR, compose
from fedsim.errors import FedsimError
from fedsim.experiment import run_experiment

SEED = 25
CASES = 250
CASE_LIMIT_S = 30
POLL_S = 0.5  # how often a running case is checked for a finished round
LONG_RUN_S = 3  # a case that finished a round still runs this long, to reach later rounds
BASE = ["logger=none", "progress=false", "num_clients=4", "clients_per_round=2", "num_rounds=1",
        "evaluation.clients_per_round=1", "model=mlp", "dataset=digits", "client.local_epochs=1",
        "checkpoint.every=0", "plots.enabled=false"]
#: groups a case may switch (the others need a network, a GPU or data files to be useful)
SWITCHED = ("strategy", "client", "optimizer", "partition", "model", "attack", "devices")
VALUES = [
    "x", "''", "true", "false", "null", "[]", "[1,2]", "{}", "{a:1}",
    "-1", "0", "-0.5", "1", "2", "3", "0.5", "0.999", "1.5", "100",
    "nan", "inf", "-inf", "1e308", "-1e308", "1e-300", "5e-324", "99999999999999999999",
    "9223372036854775808", "1000000", "1e6", "1e-9",
]
UNKNOWN_KEYS = ["+nope", "+strategy.nope", "nope.deeper", "+client.momentun", "+data.x"]


class CaseTimeoutError(BaseException):
    """A case finished a round and was stopped, or ran past `CASE_LIMIT_S`."""


class CaseClock:
    """A SIGALRM handler polling the running case: it stops the case once its run
    recorded a round and ran `LONG_RUN_S` (a valid long run), or at `CASE_LIMIT_S`."""

    def __init__(self) -> None:
        self.run_dir = Path()
        self.started = 0.0

    def start(self, run_dir: Path) -> None:
        self.run_dir, self.started = run_dir, time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, POLL_S, POLL_S)

    @staticmethod
    def stop() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    def __call__(self, signum: int, frame: object) -> None:
        elapsed = time.monotonic() - self.started
        if elapsed > CASE_LIMIT_S or (elapsed > LONG_RUN_S and last_round(self.run_dir) >= 1):
            raise CaseTimeoutError


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        if key == "hydra" or str(key).startswith("_"):
            continue
        node = cfg._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(node, DictConfig):
            keys += leaf_keys(node, f"{name}.")
        else:
            keys.append(name)
    return keys


def make_case(rng: random.Random, keys: list[str]) -> list[str]:
    """One to three overrides: maybe another group option, then values or unknown keys."""
    case = []
    if rng.random() < 0.4:
        group = rng.choice(SWITCHED)
        options = group_options(group)
        case.append(f"{group}={rng.choice([*options, options[0] + 'x'])}")
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.1:
            case.append(f"{rng.choice(UNKNOWN_KEYS)}={rng.choice(VALUES)}")
        else:
            case.append(f"{rng.choice(keys)}={rng.choice(VALUES)}")
    return case


def cases() -> list[list[str]]:
    rng = random.Random(SEED)
    keys = [k for k in leaf_keys(compose(BASE)) if k not in ("output_dir", "resume")]
    return [make_case(rng, keys) for _ in range(CASES)]


def run_case(overrides: list[str], out: Path) -> str:
    """'ran', or 'refused: <line>' for a one-line refusal; anything else raises."""
    try:
        cfg = compose([*BASE, *overrides, f"output_dir={out}"])
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        return f"refused: {explain(err, overrides)}"
    try:
        summary = run_experiment(cfg)
    except FedsimError as err:
        return f"refused: {err}"
    accuracy = summary["final_server_accuracy"]
    assert accuracy is None or 0 <= accuracy <= 1 or math.isnan(accuracy), summary
    return "ran"


def last_round(run_dir: Path) -> int:
    """The last round a case's run recorded in full (0: none finished)."""
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    rows = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return json.loads(rows[-1])["round"] if rows else 0


def test_random_overrides_run_or_are_refused_with_one_line(tmp_path):
    clock = CaseClock()
    old = signal.signal(signal.SIGALRM, clock)
    tally: dict[str, int] = {"ran": 0, "refused": 0}
    started = time.monotonic()
    try:
        for number, overrides in enumerate(cases()):
            clock.start(tmp_path / f"case{number}")
            try:
                outcome = run_case(overrides, tmp_path / f"case{number}")
            except CaseTimeoutError:
                # a valid long run (num_rounds=1000000) is fine once it has finished a round
                if last_round(tmp_path / f"case{number}") < 1:
                    pytest.fail(f"case {number} {overrides} finished no round in "
                                f"{CASE_LIMIT_S} s")
                outcome = "ran"
            except Exception as err:  # noqa: BLE001 - the point: no other exception
                pytest.fail(f"case {number} {overrides}: {type(err).__name__}: {err}")
            finally:
                clock.stop()
            assert "\n" not in outcome, f"case {number} {overrides}: {outcome}"
            tally[outcome.split(":")[0]] += 1
            if outcome.startswith("refused"):  # nothing left behind by a refused run
                assert not (tmp_path / f"case{number}" / "metrics.jsonl").exists(), overrides
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"fuzz: {CASES} cases (seed {SEED}): {tally['ran']} ran, {tally['refused']} refused, "
          f"{time.monotonic() - started:.0f} s")
    assert tally["ran"] > 10 and tally["refused"] > 10, tally  # both outcomes are exercised

