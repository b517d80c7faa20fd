"""One run per run directory: an exclusive claim, taken before anything is written.

Two runs pointed at the same directory (the same `output_dir` or `hydra.run.dir`)
would interleave their `metrics.jsonl` rows and both report success. A run therefore
claims its directory first: it takes an exclusive `flock` on `.fedsim-run` inside it,
held for the process's life (the kernel drops it when the process dies, however it
dies), and only then checks what the directory holds. The loser of a race sees the
lock taken and is refused; a later run sees the winner's metrics and is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from fedsim.errors import ConfigError

CLAIM_FILE = ".fedsim-run"
METRICS_FILE = "metrics.jsonl"
#: the run's resolved config (resume and comparisons check it)
CONFIG_FILE = "config.yaml"
#: a finished run: it can be neither reused nor resumed
SUMMARY_FILE = "summary.json"
#: files whose presence means the directory holds a run (one fedsim never overwrites)
RUN_OUTPUTS = (METRICS_FILE, SUMMARY_FILE)

#: claims this process holds: resolved directory -> the open file that holds the lock
_HELD: dict[Path, int] = {}


def holds(run_dir: Path) -> bool:
    """Whether this process holds the claim on `run_dir`."""
    return Path(run_dir).resolve() in _HELD


def claim(run_dir: Path, fresh: bool = True, field: str = "output_dir") -> Path:
    """Claim `run_dir` for this process (creating it); return it.

    `fresh`: a new run, so the directory must not hold a run yet. Otherwise (resume) it must
    hold an unfinished one. Refused with a `ConfigError` naming the directory when another
    process holds it, or when it is a file, lies under a file, or cannot be written.
    """
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key not in _HELD:
        _HELD[key] = _lock(run_dir, field)
    try:
        _check_contents(run_dir, fresh, field)
    except ConfigError:
        release(run_dir)
        raise
    return run_dir


def release(run_dir: Path) -> None:
    """Drop this process's claim on `run_dir` (the claim file stays: it is harmless)."""
    fd = _HELD.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases its flock


def _lock(run_dir: Path, field: str) -> int:
    """Create `run_dir` and lock its claim file; the open descriptor holds the lock."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / CLAIM_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{field} '{run_dir}' is a file or lies under a file; choose a "
                          "directory path (a new one, or an unfinished run's to resume)") from None
    except PermissionError:
        raise ConfigError(f"{field} '{run_dir}' cannot be written (permission denied); "
                          "choose a directory you can write to") from None
    except OSError as err:
        raise ConfigError(f"{field} '{run_dir}' cannot be created ({err.strerror}); "
                          "choose another directory") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise ConfigError(f"{field} '{run_dir}' is in use by another fedsim run right now; "
                          f"choose another {field} (two runs never share one)") from None
    return fd  # the file stays empty: opening it changes nothing in a finished run's folder


def _check_contents(run_dir: Path, fresh: bool, field: str) -> None:
    """Under the claim: a new run needs a directory without a run; a resumed run an
    unfinished one."""
    if fresh and any((run_dir / name).exists() for name in RUN_OUTPUTS):
        raise ConfigError(f"{field} '{run_dir}' already holds a run; choose a new {field} "
                          "(fedsim never overwrites a run's outputs)")
    if not fresh and (run_dir / SUMMARY_FILE).exists():
        raise ConfigError(f"resume: the run in '{run_dir}' has finished (it has a "
                          f"{SUMMARY_FILE}); there is nothing to resume")
