"""A fuzz test of the config check (issue #25).

Seeded random overrides (wrong types, signs, NaN and infinities, huge and tiny
values, unknown keys and options, other group options) on a tiny config. Each case
either runs one round to completion, or is refused with one line: a `FedsimError`
(exit 2 from the CLI) or a command-line mistake that `fedsim.cli.explain` words as
one line. Never another exception, never a hang: each case has `CASE_LIMIT_S` to
finish a round, and a valid long run (num_rounds=1000000) is stopped once it has
finished one and run `LONG_RUN_S`. Every `PLOTTED`-th case draws its plots.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
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

pytestmark = pytest.mark.long_running(seconds=55)  # started first: conftest.py

SEED = 25
CASES = 160  # about 0.3 s each, most of it composing the config (Hydra)
CASE_LIMIT_S = 30
POLL_S = 0.5  # how often the clock looks at a running case's metrics
LONG_RUN_S = 3  # a case that finished a round still runs this long, to reach later rounds
PLOTTED = 5  # every 5th case runs with plots.enabled=true (the others skip them: faster)
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


class CaseStopped(BaseException):
    """The clock stopped a case: it finished a round of a long run, or hit `CASE_LIMIT_S`."""


class CaseClock:
    """Watches the running case from a thread, every `POLL_S`; once the run recorded a
    round with rounds still to go and ran `LONG_RUN_S` (a valid long run), or at
    `CASE_LIMIT_S`, it sends one SIGALRM to the main thread, whose handler raises
    `CaseStopped` there. One signal per case: the run's own cleanup is not interrupted
    again, and no signal arrives once `stop` returned."""

    def __init__(self) -> None:
        self.armed = False
        self._done = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, run_dir: Path, num_rounds: int) -> None:
        self._done = threading.Event()
        self.armed = True
        self._watcher = threading.Thread(
            target=self._watch, args=(run_dir, num_rounds, time.monotonic(), self._done),
            daemon=True)
        self._watcher.start()

    def _watch(self, run_dir: Path, num_rounds: int, started: float,
               done: threading.Event) -> None:
        while not done.wait(POLL_S):
            elapsed = time.monotonic() - started
            if elapsed > CASE_LIMIT_S or (
                    elapsed > LONG_RUN_S and 1 <= last_round(run_dir) < num_rounds):
                signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
                return

    def stop(self) -> None:
        self._done.set()
        if self._watcher is not None:
            self._watcher.join()
        self.armed = False  # a signal still pending after this is ignored

    def __call__(self, signum: int, frame: object) -> None:
        if self.armed:
            self.armed = False
            raise CaseStopped


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


def run_case(overrides: list[str], out: Path, clock: CaseClock) -> str:
    """'ran', or 'refused: <line>' for a one-line refusal; anything else raises. The
    clock runs from the composed config's run on; `stop` it afterwards."""
    try:
        cfg = compose([*BASE, *overrides, f"output_dir={out}"])
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        return f"refused: {explain(err, overrides)}"
    rounds = cfg.num_rounds if isinstance(cfg.num_rounds, int) else 1
    clock.start(out, rounds)
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
            if number % PLOTTED == 0:  # before the case's own overrides, which may say false
                overrides = ["plots.enabled=true", *overrides]
            try:
                try:
                    outcome = run_case(overrides, tmp_path / f"case{number}", clock)
                finally:
                    clock.stop()
            except CaseStopped:
                # a valid long run (num_rounds=1000000) is fine once it has finished a round
                if last_round(tmp_path / f"case{number}") < 1:
                    pytest.fail(f"case {number} {overrides} finished no round in "
                                f"{CASE_LIMIT_S} s")
                outcome = "ran"
            except Exception as err:  # noqa: BLE001 - the point: no other exception
                pytest.fail(f"case {number} {overrides}: {type(err).__name__}: {err}")
            assert "\n" not in outcome, f"case {number} {overrides}: {outcome}"
            tally[outcome.split(":")[0]] += 1
            if outcome.startswith("refused"):  # nothing left behind by a refused run
                assert not (tmp_path / f"case{number}" / "metrics.jsonl").exists(), overrides
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"fuzz: {CASES} cases (seed {SEED}): {tally['ran']} ran, {tally['refused']} refused, "
          f"{time.monotonic() - started:.0f} s")
    assert tally["ran"] > 10 and tally["refused"] > 10, tally  # both outcomes are exercised

