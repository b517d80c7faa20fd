"""Regenerate the README's headline figures and preset times from real runs.

    python scripts/headline.py                  # the default run (`make run`), seed 0
    python scripts/headline.py --presets all    # also time every preset that runs offline
    python scripts/headline.py --presets w1 frl_mnist1d
    python scripts/headline.py --render         # rewrite the README from the record alone

Each run is the installed `fedsim` in a fresh empty folder, exactly as a user types it
(the default logger included), timed from the command's start to its exit. What it
measured goes to docs/results/headline.json with the date, the command, the seed and the
resolved config; the README's blocks between `<!-- headline:begin/end -->` and
`<!-- presets:begin/end -->` are then rendered from that record, so the README quotes
nothing that no run produced. tests/test_headline.py fails when the README and the record
disagree, or when the default config changed since the recorded run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECORD = ROOT / "docs" / "results" / "headline.json"
PRESETS_DIR = ROOT / "fedsim" / "conf" / "experiment"
FEDSIM = str(Path(sys.executable).with_name("fedsim"))
#: presets that need what this machine may not have; never timed by this script
NOT_TIMED = {"fedld_cifar10": "needs the Hub (and, in practice, a GPU)"}
#: how a preset is launched, where it is not `fedsim +experiment=<name>`
LAUNCH = {
    "alpha_sweep": ["-m", "+experiment=alpha_sweep"],
}
#: keys of a run's stored config that name where it ran, not what it ran
RUN_SPECIFIC = ("output_dir",)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_command(name: str) -> list[str]:
    """The command a user types for preset `name`, as an argv."""
    if name.startswith("deploy_"):
        return [str(ROOT / "scripts" / "deploy_local.sh"), name]
    return [FEDSIM, *LAUNCH.get(name, [f"+experiment={name}"])]


def shown(argv: list[str]) -> str:
    """`argv` as the README shows it: program names without their folders."""
    return " ".join([Path(argv[0]).name if argv[0] == FEDSIM else
                     str(Path(argv[0]).relative_to(ROOT)), *argv[1:]])


def timed_run(argv: list[str]) -> tuple[float, Path]:
    """Run `argv` in a fresh folder (the deployment script in the repository); wall seconds
    and the folder the run wrote. Stops this script on a failed run."""
    folder = Path(tempfile.mkdtemp(prefix="fedsim-headline-"))
    cwd = ROOT if argv[0] != FEDSIM else folder
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"headline: `{shown(argv)}` failed with exit {proc.returncode}:\n"
                 f"{proc.stdout[-3000:]}")
    return seconds, folder


def comparable_config(config: dict) -> dict:
    """A run's resolved config without the keys that only say where it ran."""
    return {k: v for k, v in config.items() if k not in RUN_SPECIFIC}


def default_run() -> dict:
    """The default experiment (`make run` without ARGS), timed, with its final accuracy."""
    from omegaconf import OmegaConf

    argv = [FEDSIM]
    seconds, folder = timed_run(argv)
    (summary_file,) = folder.glob("outputs/*/*/summary.json")
    summary = json.loads(summary_file.read_text())
    config = OmegaConf.to_container(OmegaConf.load(summary_file.with_name("config.yaml")))
    return {
        "command": shown(argv),
        "date": date.today().isoformat(),
        "seed": config["seed"],
        "seconds": round(seconds, 1),
        "final_server_accuracy": summary["final_server_accuracy"],
        "config": comparable_config(config),
    }


def preset_run(name: str) -> dict:
    argv = preset_command(name)
    seconds, _ = timed_run(argv)
    return {"command": shown(argv), "date": date.today().isoformat(), "seconds": round(seconds)}


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__}


# ---- rendering the README from the record ----------------------------------------------


def duration(seconds: float) -> str:
    """`25 s` under two minutes, else whole minutes: `17 min`."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{round(seconds / 60)} min"


def headline_text(record: dict) -> str:
    run, cpus = record["default"], record["machine"]["cpus"]
    return (f"The default experiment (`{run['command']}`, seed {run['seed']}) reached "
            f"{run['final_server_accuracy']:.3f} final test accuracy in "
            f"{duration(run['seconds'])} on {cpus} CPU cores ({run['date']}; regenerated by "
            f"`python scripts/headline.py` from a real run).")


def preset_time(name: str, record: dict) -> str:
    if name in NOT_TIMED:
        return f"not timed: {NOT_TIMED[name]}"
    timing = record.get("presets", {}).get(name)
    return duration(timing["seconds"]) if timing else "not timed yet"


def render_presets(table: str, record: dict) -> str:
    """The presets table with each row's last cell set to that preset's recorded time."""
    def row(match: re.Match) -> str:
        return f"{match.group(1)}{preset_time(match.group(2), record)} |"

    return re.sub(r"^(\| `([a-z0-9_]+)` \|.*\| )[^|]*\|$", row, table, flags=re.M)


def replace_block(text: str, marker: str, render) -> str:
    """Replace what stands between `<!-- marker:begin -->` and `<!-- marker:end -->`."""
    pattern = re.compile(rf"(<!-- {marker}:begin -->\n)(.*?)(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        sys.exit(f"headline: README.md has no <!-- {marker}:begin/end --> block")
    return pattern.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(3), text)


def render_readme(text: str, record: dict) -> str:
    text = replace_block(text, "headline", lambda _: headline_text(record) + "\n")
    return replace_block(text, "presets", lambda table: render_presets(table, record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=[],
                        help="presets to time ('all': every one that runs offline)")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite the README from docs/results/headline.json")
    args = parser.parse_args()
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {"presets": {}}
    if not args.render:
        names = [n for n in preset_names() if n not in NOT_TIMED] \
            if args.presets == ["all"] else args.presets
        unknown = sorted(set(names) - set(preset_names()) | set(names) & set(NOT_TIMED))
        if unknown:
            sys.exit(f"headline: --presets: cannot time {unknown}; choose from "
                     f"{[n for n in preset_names() if n not in NOT_TIMED]} or 'all'")
        record["machine"] = machine()
        record["default"] = default_run()
        print(headline_text(record))
        for name in names:
            record["presets"][name] = preset_run(name)
            print(f"{name}: {duration(record['presets'][name]['seconds'])}")
        RECORD.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    README.write_text(render_readme(README.read_text(), record))


if __name__ == "__main__":
    main()
