"""Faults injected on the client side, to exercise the server's reply check.

`inject_faults` is the client side of `faults.crash_prob`, `nan_prob`,
`hang_prob`: drawn from (seed, partition, round), so the same clients fail on
every backend and on every rerun. `poisoned` is the upload of a client drawn to
send NaN. What the server makes of such replies is `fedsim.reply_check`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

FAULT_STREAM = 0xFA017  # keeps fault draws apart from the training seeds


class InjectedFaultError(RuntimeError):
    """A client failure injected by `faults.crash_prob`."""


@dataclass(frozen=True)
class FaultDraw:
    """What happens to one train message: crash, upload NaN, sleep first."""

    crash: bool
    nan: bool
    hang_s: float


def draw_faults(faults, seed: int, partition_id: int, server_round: int) -> FaultDraw:
    """The faults of this client in this round, drawn from (seed, partition, round) only."""
    crash_prob, nan_prob = float(faults.crash_prob), float(faults.nan_prob)
    hang_prob = float(faults.hang_prob)
    if crash_prob == nan_prob == hang_prob == 0:
        return FaultDraw(False, False, 0.0)
    rng = np.random.default_rng([FAULT_STREAM, seed, partition_id, server_round])
    kind, hang = rng.random(2)
    return FaultDraw(
        crash=kind < crash_prob,
        nan=crash_prob <= kind < crash_prob + nan_prob,
        hang_s=float(faults.hang_s) if hang < hang_prob else 0.0,
    )


def inject_faults(faults, seed: int, partition_id: int, server_round: int) -> FaultDraw:
    """Sleep or raise as drawn for this train message; the caller poisons the upload."""
    fault = draw_faults(faults, seed, partition_id, server_round)
    if fault.hang_s:
        time.sleep(fault.hang_s)
    if fault.crash:
        raise InjectedFaultError(f"injected crash (faults.crash_prob) in round {server_round}")
    return fault


def poisoned(arrays: ArrayRecord) -> ArrayRecord:
    """`arrays` with every floating entry set to NaN (what a diverged client uploads), and
    every integer one to its dtype's largest value (no valid ranking, for rank-uploading
    clients)."""
    out = {}
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating):
            values = np.full_like(values, np.nan)
        elif np.issubdtype(values.dtype, np.integer):
            values = np.full_like(values, np.iinfo(values.dtype).max)
        out[key] = Array(values)
    return ArrayRecord(out)
