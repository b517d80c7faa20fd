"""Workloads W1, W2, W3 and C1 (../shared/specs/workloads.md) run several ways; wall seconds.

W1 (`--workload w1`): MNIST-1D train split, 100 IID clients, 20 a round, 50 rounds, 1 local
epoch, batch 32, SGD lr 0.05, MLP 40-100-100-10, no evaluation. Ways: `raw` (a plain
PyTorch loop, the floor), `flower` (vanilla Flower: a plain ClientApp + Flower's FedAvg
under run_simulation on Ray, 1 CPU per client), and fedsim's ways (`FEDSIM_WAYS["w1"]`):
`fedsim` (default in-process backend), `fedsim-ray` (fedsim's Ray actor pool),
`fedsim-flower` (fedsim's apps on Flower's Ray engine), `fedsim-parallel` (in-process with a
forked worker per core), `fedsim-batched` (the cohort as one vmap computation) and
`fedsim-batched-parallel` (both).

W2 (`--workload w2`, population scale): as W1, but 100, 10,000 and 100,000 registered
clients (`partition=resample`: each draws 40 samples with replacement from the train
split), 100 a round, 20 rounds, in-process backend. Ways `fedsim-<population>`; ratios
are to `fedsim-100`. Goal: per-round time and peak RSS at 100,000 within 1.2x of 100.

W3 (`--workload w3`, pfl-research's CIFAR-10 benchmark on synthetic data): 1000 users x 50
CIFAR-shaped synthetic images (`dataset=synthetic_images`, 50,000 / 10,000), 50 users a
round, 1 local epoch, batch 10, local SGD lr 0.1 without momentum, pfl-research's
2-conv CNN (`model=pfl_cnn`), no evaluation, 3 rounds. Ways `raw`, `flower`, `fedsim`,
`fedsim-parallel` (its dropout rules out `backend.batched`).

C1 (`--workload central`): centralized training, the non-federated methods' mode: one
client holding the whole MNIST-1D train split, `CENTRAL_EPOCHS` epochs a round, batch 32,
SGD lr 0.05, the same MLP, no evaluation. Ways: `central-raw` (a plain PyTorch epoch
loop) and `central-fedsim` (`+experiment=centralized`). Goal: central-fedsim <= 1.1x.

Each way runs in its own Python process; the clock starts after imports and data
generation and stops when the final global weights exist (Ray start-up is inside the
clock). A fedsim way is its workload's config plus the overrides in `FEDSIM_WAYS`: a new
way is one more entry there.

    python scripts/bench.py                      # W1, W2, W3: one table, medians of 3 passes
    python scripts/bench.py --workload w1 --ways fedsim fedsim-ray --repeat 5
    python scripts/bench.py --workload central   # C1: centralized cost over a plain loop
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 0
W1_CLIENTS, W1_COHORT, BATCH, LR = 100, 20, 32, 0.05
CENTRAL_EPOCHS = 5
POPULATIONS = (100, 10_000, 100_000)
W3_CLIENTS, W3_COHORT, W3_BATCH, W3_LR, W3_SAMPLES = 1000, 50, 10, 0.1, 60_000

#: settings every fedsim way shares: no outputs beyond the run directory, no evaluation
COMMON: dict[str, Any] = {
    "logger": "none", "progress": "false", "device": "cpu", "seed": SEED,
    "evaluation.server_every": 0, "evaluation.clients_per_round": 0,
}
W1_CONFIG: dict[str, Any] = {
    "dataset": "mnist1d", "partition": "iid", "model": "mlp", "model.hidden": "[100,100]",
    "strategy": "fedavg", "num_clients": W1_CLIENTS, "clients_per_round": W1_COHORT,
    "client.local_epochs": 1, "client.batch_size": BATCH, "client.lr": LR,
    "client.momentum": 0.0,
}
W2_CONFIG: dict[str, Any] = {
    **W1_CONFIG, "backend": "inprocess", "partition": "resample",
    "partition.samples_per_client": 40, "clients_per_round": 100,
}
W3_CONFIG: dict[str, Any] = {
    "dataset": "synthetic_images", "dataset.num_samples": W3_SAMPLES, "partition": "iid",
    "model": "pfl_cnn", "strategy": "fedavg", "num_clients": W3_CLIENTS,
    "clients_per_round": W3_COHORT, "client.local_epochs": 1, "client.batch_size": W3_BATCH,
    "client.lr": W3_LR, "client.momentum": 0.0,
}
#: fedsim's ways of each workload: way -> overrides on top of the workload's config
FEDSIM_WAYS: dict[str, dict[str, dict[str, Any]]] = {
    "w1": {
        "fedsim": {"backend": "inprocess"},
        "fedsim-ray": {"backend": "ray"},
        "fedsim-flower": {"backend": "flower"},
        # every core: a forked worker per core shares each round's clients (same run)
        "fedsim-parallel": {"backend": "inprocess", "backend.workers": "auto"},
        # the round's cohort as one vmap computation, on one core, then on every core
        "fedsim-batched": {"backend": "inprocess", "backend.batched": "true"},
        "fedsim-batched-parallel": {"backend": "inprocess", "backend.batched": "true",
                                    "backend.workers": "auto"},
    },
    "w2": {f"fedsim-{n}": {"num_clients": n} for n in POPULATIONS},
    "w3": {"fedsim": {"backend": "inprocess"},
           "fedsim-parallel": {"backend": "inprocess", "backend.workers": "auto"}},
}
WORKLOAD_CONFIGS = {"w1": W1_CONFIG, "w2": W2_CONFIG, "w3": W3_CONFIG}


@dataclass(frozen=True)
class Workload:
    """A named workload: its ways, the way its ratios are to, its run lengths."""

    name: str
    base: str  # the way every ratio is to
    ways: tuple[str, ...]
    rounds: int
    short_rounds: int  # the second, shorter run that splits fixed and per-round cost


WORKLOADS = {
    "w1": Workload("w1", "raw",
                   ("raw", "flower", *FEDSIM_WAYS["w1"]), 50, 10),
    "w2": Workload("w2", "fedsim-100", tuple(FEDSIM_WAYS["w2"]), 20, 5),
    "w3": Workload("w3", "raw", ("raw", "flower", *FEDSIM_WAYS["w3"]), 3, 1),
    "central": Workload("central", "central-raw", ("central-raw", "central-fedsim"), 10, 2),
}
DEFAULT_WORKLOADS = ("w1", "w2", "w3")


@dataclass(frozen=True)
class FedAvgJob:
    """What a raw or Flower way trains: data, equal IID parts, the model, local SGD."""

    x: Any  # np.ndarray of samples
    y: Any  # np.ndarray of labels
    parts: Any  # np.ndarray, one row of sample indices per client
    model_fn: Callable[[], Any]
    cohort: int
    batch: int
    lr: float


def iid_parts(num_samples: int, num_clients: int):
    """Equal IID parts (one row per client) from a seeded permutation."""
    import numpy as np

    order = np.random.default_rng(SEED).permutation(num_samples)
    return order[: num_samples // num_clients * num_clients].reshape(num_clients, -1)


def w1_job() -> FedAvgJob:
    from fedsim.datasets import mnist1d
    from fedsim.models import MLP

    splits = mnist1d.load()
    return FedAvgJob(splits.x_train, splits.y_train, iid_parts(len(splits.y_train), W1_CLIENTS),
                     lambda: MLP([40], 10), W1_COHORT, BATCH, LR)


def w3_job() -> FedAvgJob:
    from fedsim.datasets.synthetic import load_images
    from fedsim.models import PflCNN

    splits = load_images(num_samples=W3_SAMPLES)
    return FedAvgJob(splits.x_train, splits.y_train, iid_parts(len(splits.y_train), W3_CLIENTS),
                     lambda: PflCNN([3, 32, 32], 10), W3_COHORT, W3_BATCH, W3_LR)


JOBS = {"w1": w1_job, "w3": w3_job}


def way_raw(job: FedAvgJob, rounds: int) -> float:
    """The floor: sample the cohort, train each from the global weights, weighted-average."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    x, y = torch.from_numpy(job.x), torch.from_numpy(job.y)
    parts = [torch.from_numpy(p) for p in job.parts]
    rng = np.random.default_rng(SEED)
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = job.model_fn()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(rounds):
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        chosen = rng.choice(len(parts), job.cohort, replace=False)
        n_total = sum(len(parts[c]) for c in chosen)
        for c in chosen:
            model.load_state_dict(global_state)
            optimizer = torch.optim.SGD(model.parameters(), lr=job.lr)
            xc, yc = x[parts[c]], y[parts[c]]
            for idx in torch.randperm(len(yc), generator=generator).split(job.batch):
                loss = torch.nn.functional.cross_entropy(model(xc[idx]), yc[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            for k, v in model.state_dict().items():
                total[k] += v * (len(yc) / n_total)
        global_state = total
    return time.perf_counter() - start


def save_job_arrays(job: FedAvgJob, folder: Path) -> None:
    """x, y and the parts as .npy files, which Flower's clients map from disk (a tutorial's
    clients load their partition from a cache on disk; Ray would pickle arrays captured by
    the ClientApp into every call)."""
    import numpy as np

    for name in ("x", "y", "parts"):
        np.save(folder / f"{name}.npy", getattr(job, name))


def way_flower(job: FedAvgJob, rounds: int) -> float:
    """Vanilla Flower, as its tutorials write it: a ClientApp and Flower's FedAvg."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from fedsim.backends.flower import run_flower_simulation

    num_clients, model_fn, batch, lr = len(job.parts), job.model_fn, job.batch, job.lr
    with tempfile.TemporaryDirectory() as folder:
        save_job_arrays(job, Path(folder))
        client_app = ClientApp()

        @client_app.train()
        def train(msg: Message, context: Context) -> Message:
            torch.set_num_threads(1)
            part = np.load(f"{folder}/parts.npy", mmap_mode="r")[
                context.node_config["partition-id"]]
            x = torch.from_numpy(np.load(f"{folder}/x.npy", mmap_mode="r")[part])
            y = torch.from_numpy(np.load(f"{folder}/y.npy", mmap_mode="r")[part])
            model = model_fn()
            model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
            optimizer = torch.optim.SGD(model.parameters(), lr=lr)
            for idx in torch.randperm(len(y)).split(batch):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            content = RecordDict({
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": len(y)}),
            })
            return Message(content=content, reply_to=msg)

        server_app = ServerApp()

        @server_app.main()
        def main(grid: Grid, context: Context) -> None:
            torch.manual_seed(SEED)
            strategy = FedAvg(fraction_train=job.cohort / num_clients, fraction_evaluate=0.0,
                              min_available_nodes=num_clients)
            strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().state_dict()),
                           num_rounds=rounds)

        start = time.perf_counter()
        run_flower_simulation(server_app, client_app, num_clients, num_cpus=1, num_gpus=0.0)
        return time.perf_counter() - start


def fedsim_overrides(settings: dict[str, Any]) -> list[str]:
    """Hydra overrides from a settings dict (one entry per key: the dict merged them)."""
    return [f"{key}={value}" for key, value in settings.items()]


def way_fedsim(settings: dict[str, Any], rounds: int) -> float:
    """fedsim on `settings` (a workload's config plus a way's overrides)."""
    from fedsim.config import compose
    from fedsim.datasets.federated import build_federated_data
    from fedsim.experiment import run_experiment

    with tempfile.TemporaryDirectory() as out:
        cfg = compose(fedsim_overrides(
            {**settings, "num_rounds": rounds, "output_dir": f"{out}/run"}))
        build_federated_data(cfg)  # data generation outside the clock, as for the other ways
        start = time.perf_counter()
        run_experiment(cfg)
        stop_ray()
        return time.perf_counter() - start


def stop_ray() -> None:
    """fedsim keeps Ray up for later runs; a single run pays its stop."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def way_central_raw(rounds: int) -> float:
    """The floor for C1: plain epochs of minibatch SGD over the whole train split."""
    import torch

    from fedsim.datasets import mnist1d
    from fedsim.models import MLP

    torch.set_num_threads(1)
    splits = mnist1d.load()
    start = time.perf_counter()
    x, y = torch.from_numpy(splits.x_train), torch.from_numpy(splits.y_train)
    generator = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = MLP([40], 10)
    for _ in range(rounds):
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)  # fedsim: fresh each round too
        for _ in range(CENTRAL_EPOCHS):
            for idx in torch.randperm(len(y), generator=generator).split(BATCH):
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return time.perf_counter() - start


def way_central_fedsim(rounds: int) -> float:
    """C1 through fedsim: the centralized preset (one client, FedAvg over one = identity)."""
    common = {k: v for k, v in COMMON.items() if k != "evaluation.clients_per_round"}
    return way_fedsim({  # the preset's own client evaluation
        **common, "+experiment": "centralized", "dataset": "mnist1d", "model": "mlp",
        "model.hidden": "[100,100]", "client.local_epochs": CENTRAL_EPOCHS,
        "client.batch_size": BATCH, "client.lr": LR, "client.momentum": 0.0,
    }, rounds)


def warm_up_imports() -> None:
    """Import what torch imports lazily on first use (torch._dynamo, ~1-2 s) off the clock."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def run_way(workload: str, way: str, rounds: int) -> float:
    """One way of one workload, `rounds` rounds, in this process; its wall seconds."""
    warm_up_imports()
    if way == "central-raw":
        return way_central_raw(rounds)
    if way == "central-fedsim":
        return way_central_fedsim(rounds)
    if way in ("raw", "flower"):
        job = JOBS[workload]()
        return way_raw(job, rounds) if way == "raw" else way_flower(job, rounds)
    return way_fedsim({**COMMON, **WORKLOAD_CONFIGS[workload], **FEDSIM_WAYS[workload][way]},
                      rounds)


def measure_in_subprocess(workload: str, way: str, rounds: int) -> dict:
    """Run one way in a fresh interpreter; its wall seconds and peak RSS (driver process)."""
    out = subprocess.run(
        [sys.executable, __file__, "--workload", workload, "--child", way,
         "--rounds", str(rounds)],
        capture_output=True, text=True, check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{workload} {way} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def split_costs(long_s: float, short_s: float, rounds: int, short: int) -> dict[str, float]:
    """Per-round cost is the slope between the two run lengths; the rest is fixed cost
    (start-up, outputs, shutdown)."""
    per_round = (long_s - short_s) / (rounds - short)
    return {"seconds": long_s, "per_round_s": per_round, "fixed_s": long_s - rounds * per_round}


def measure(workload: str, ways: list[str], rounds: int, short: int, repeat: int
            ) -> dict[str, dict]:
    """Median over `repeat` interleaved passes of each way at `rounds` and `short` rounds."""
    samples: dict[str, dict[str, list[float]]] = {
        w: {"long": [], "short": [], "rss": []} for w in ways
    }
    for _ in range(repeat):
        for way in ways:  # interleaved, so slow drifts of the machine hit every way alike
            long_run = measure_in_subprocess(workload, way, rounds)
            samples[way]["long"].append(long_run["seconds"])
            samples[way]["rss"].append(long_run["peak_rss_mib"])
            samples[way]["short"].append(measure_in_subprocess(workload, way, short)["seconds"])
    return {
        way: {
            **split_costs(statistics.median(s["long"]), statistics.median(s["short"]),
                          rounds, short),
            "peak_rss_mib": max(s["rss"]),
            "samples_long": s["long"],
            "samples_short": s["short"],
        }
        for way, s in samples.items()
    }


def ratio(value: float, base: float) -> str:
    """`value / base` for the table ("-" when the base is not positive: too short to split)."""
    return f"{value / base:.2f}" if base > 0 else "-"


def table_rows(name: str, base_way: str, results: dict[str, dict]) -> list[str]:
    """One markdown row per way of workload `name`, ratios to its base way."""
    base = results[base_way]
    return [
        f"| {name} | {way} | {r['seconds']:.2f} | {ratio(r['seconds'], base['seconds'])}"
        f" | {1000 * r['per_round_s']:.1f} | {ratio(r['per_round_s'], base['per_round_s'])} | "
        f"{r['fixed_s']:.2f} | {r['peak_rss_mib']:.0f} | "
        f"{ratio(r['peak_rss_mib'], base['peak_rss_mib'])} |"
        for way, r in results.items()
    ]


TABLE_HEAD = ("| workload | way | total s | x base | per round ms | x base | fixed s | "
              "peak RSS MiB | x base |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
BASES_NOTE = ("x base: ratio to the workload's base way: raw for W1 and W3, central-raw for "
              "C1, fedsim-100 (100 registered clients) for W2.")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
#: the files whose bench block `--readme` rewrites from the record
DOCS = (Path(__file__).resolve().parents[1] / "README.md",
        Path(__file__).resolve().parents[1] / "docs" / "benchmark.md")


def render(record: dict) -> str:
    """The markdown table of a bench record (`--json`), with when, where and how it ran."""
    rows = [row for name, w in record["workloads"].items()
            for row in table_rows(name, w["base"], w["results"])]
    lengths = ", ".join(f"{name.upper()} {w['rounds']} rounds (per-round cost against "
                        f"{w['short_rounds']})" for name, w in record["workloads"].items())
    return "\n".join([
        f"Measured {record['date']} at commit {record['commit']} on {record['machine']}: "
        f"`{record['command']}`; {lengths}; medians of {record['repeat']} interleaved "
        f"passes. {BASES_NOTE}",
        "",
        TABLE_HEAD,
        *rows,
    ])


def with_block(text: str, block: str) -> str:
    """`text` with what lies between the bench markers replaced by `block`."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return f"{text[:start]}\n{block}\n{text[end:]}"


def machine() -> str:
    import os
    import platform

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cores} CPU cores, {memory_gib:.0f} GiB ({platform.machine()}, no GPU used)"


def chosen_ways(workload: Workload, wanted: list[str] | None) -> list[str]:
    """The workload's ways among `wanted` (all when None), its base way first; none when
    `wanted` names none of them."""
    ways = [w for w in workload.ways if wanted is None or w in wanted]
    if not ways:
        return []
    return ways if workload.base in ways else [workload.base, *ways]


def all_ways() -> list[str]:
    return sorted({way for workload in WORKLOADS.values() for way in workload.ways})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("all", *WORKLOADS), default="all",
                        help="all (default): W1, W2 and W3 in one table; central: C1")
    parser.add_argument("--ways", nargs="+", choices=all_ways(),
                        help="default: every way of each workload (its base way is added)")
    parser.add_argument("--rounds", type=int, help="default: the workload's own "
                        + ", ".join(f"{w.name} {w.rounds}" for w in WORKLOADS.values()))
    parser.add_argument("--short-rounds", type=int,
                        help="second, shorter run used to split fixed and per-round cost "
                        "(default: " + ", ".join(f"{w.name} {w.short_rounds}"
                                                 for w in WORKLOADS.values()) + ")")
    parser.add_argument("--repeat", type=int, default=3, help="passes; medians are reported")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--readme", action="store_true",
                        help="rewrite the bench tables of README.md and docs/benchmark.md "
                        "from this run (with --json: from the record written)")
    parser.add_argument("--render", metavar="JSON",
                        help="rewrite those tables from a recorded run alone, no measuring")
    parser.add_argument("--child", choices=all_ways(), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.workload == "all":
        parser.error("--child needs a --workload")
    names = DEFAULT_WORKLOADS if args.workload == "all" else (args.workload,)
    if args.ways and not any(chosen_ways(WORKLOADS[n], args.ways) for n in names):
        parser.error(f"--ways names no way of --workload {args.workload}")
    args.workloads = names
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        rounds = args.rounds or WORKLOADS[args.workload].rounds
        seconds = run_way(args.workload, args.child, rounds)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"way": args.child, "seconds": seconds, "peak_rss_mib": peak_mib}))
        return
    if args.render:
        write_docs(json.loads(Path(args.render).read_text()))
        return
    from datetime import date

    from fedsim.comparison import current_commit

    record = {"date": date.today().isoformat(), "commit": current_commit(), "machine": machine(),
              "command": "python " + " ".join(["scripts/bench.py", *sys.argv[1:]]),
              "repeat": args.repeat, "workloads": {}}
    for name in args.workloads:
        workload = WORKLOADS[name]
        ways = chosen_ways(workload, args.ways)
        if not ways:
            continue
        rounds = args.rounds or workload.rounds
        short = args.short_rounds or workload.short_rounds
        results = measure(name, ways, rounds, short, args.repeat)
        record["workloads"][name] = {"rounds": rounds, "short_rounds": short,
                                     "base": workload.base, "results": results}
    print(render(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    if args.readme:
        write_docs(record)


def write_docs(record: dict) -> None:
    for path in DOCS:
        path.write_text(with_block(path.read_text(), render(record)))


if __name__ == "__main__":
    main()
