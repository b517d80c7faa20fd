"""Checkpoints that are safe to load (#25): data only, refused when they are not a run's own."""

from __future__ import annotations

import dataclasses
import enum
import errno
import io
import json
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

from fedsim import checkpoint, codec
from fedsim.clock import VirtualClock
from fedsim.config import compose
from fedsim.errors import ConfigError
from fedsim.experiment import run_experiment
from fedsim.recording import RunRecorder
from fedsim.runtime import build_federated_data, model_factory
from fedsim.state import changed_attributes

RUN = ["num_rounds=4", "checkpoint.every=2"]


# ---- values -----------------------------------------------------------------------------


@codec.allow_class
@dataclasses.dataclass(frozen=True)
class Point:
    """A method's own dataclass, registered by its module."""

    x: float
    label: str = "p"


@codec.allow_class
class Colour(enum.Enum):
    RED = 1
    BLUE = "blue"


@dataclasses.dataclass
class Unregistered:
    x: int = 0


def _clock() -> VirtualClock:
    clock = VirtualClock()
    clock.schedule(3, 1.5, payload={"delta": np.ones(2, np.float32)})
    clock.schedule(1, 0.5)
    return clock


VALUES = {
    "scalars": [0, -7, 2**80, 1.5, -0.0, 1e-300, "text é", "", True, False, None],
    "non-finite floats": [float("nan"), float("inf"), float("-inf")],
    "nested dict": {"a": {"b": [1, {"c": (2, 3)}]}, "": 1},
    "non-str keys": {1: "one", (2, "two"): [2], None: 0, 2.5: "x", b"k": "bytes"},
    "tuple set frozenset": ((1, (2,)), {3, "4"}, frozenset({5}), (), set()),
    "numpy arrays": [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros((0, 4)),
                     np.array(3, np.int64), np.array([True, False]), np.array(["ab", "c"]),
                     np.arange(4, dtype=np.uint16)[::2], np.array([1 + 2j])],
    "numpy scalars": [np.float32(1.1), np.float64(np.nan), np.int8(-3), np.uint64(2**63),
                      np.bool_(True), np.float16(0.1), np.str_("s"), np.longdouble(1) / 3,
                      np.complex64(1 - 1j)],
    "torch tensors": [torch.randn(3, 2), torch.arange(5), torch.randn(4).bfloat16(),
                      torch.zeros(0, 3), torch.tensor(2.5), torch.ones(2, requires_grad=True),
                      torch.randn(3, 4).t(), torch.tensor([True, False])],
    "bytes": [b"", b"\x00\xffpickle"],
    "flower records": RecordDict({
        "arrays": ArrayRecord({"w": Array(np.ones((2, 2), np.float32)),
                               "b": Array(np.arange(3, dtype=np.int64))}),
        "metrics": MetricRecord({"loss": 0.5, "n": 3, "curve": [1.0, 2.0]}),
        "config": ConfigRecord({"name": "x", "blob": b"\x01\x02", "flags": [True, False]}),
    }),
    "flower array": Array(np.full((2,), 7, np.int32)),
    "python rng": random.Random(3).getstate(),
    "numpy rng": np.random.RandomState(4).get_state(),
    "torch rng": torch.Generator().manual_seed(5).get_state(),
    "server rng": checkpoint.rng_state(),
    "project classes": _clock(),
    "registered dataclass and enum": [Point(1.0), Point(2.0, "q"), Colour.RED, Colour.BLUE],
}


def assert_same(a, b, where="value") -> None:
    """`b` is `a`: same types all the way down, same values (arrays bit for bit)."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, np.ndarray | np.generic):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), where
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), where
        assert torch.equal(a.detach().reshape(-1), b.detach().reshape(-1)), where
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    elif isinstance(a, dict):  # Flower's records too
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, Array):
        assert (a.dtype, a.shape, a.stype, a.data) == (b.dtype, b.shape, b.stype, b.data), where
    elif hasattr(a, "__dict__") and not isinstance(a, enum.Enum):
        assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def round_trip(value, tmp_path: Path):
    path = tmp_path / "state.npz"
    with open(path, "wb") as out:
        codec.dump({"value": value}, out)
    return codec.load(path)["value"]


@pytest.mark.parametrize("kind", list(VALUES))
def test_every_kind_of_value_round_trips_exactly(kind, tmp_path):
    value = VALUES[kind]
    back = round_trip(value, tmp_path)
    assert_same(value, back)
    assert codec.fingerprint(back) == codec.fingerprint(value)


def test_equal_sets_iterating_in_other_orders_are_stored_alike():
    # A set's order follows its insertion history and the hash seed of the process (which
    # differs between a run and its resume); its encoding must not.
    items = [f"k{i}" for i in range(200)] + [b"raw", (1, "t"), frozenset({"x", "y"})]
    forward, backward = set(items), set(reversed(items))
    assert forward == backward and list(forward) != list(backward)  # the orders do differ
    (tree, arrays), (tree_back, arrays_back) = codec.encode(forward), codec.encode(backward)
    assert tree == tree_back and arrays.keys() == arrays_back.keys()
    assert all(np.array_equal(arrays[name], arrays_back[name]) for name in arrays)
    assert codec.fingerprint(forward) == codec.fingerprint(backward)
    assert codec.fingerprint(frozenset(forward)) == codec.fingerprint(frozenset(backward))


def test_the_file_is_one_npz_without_pickles(tmp_path):
    round_trip(VALUES, tmp_path)
    with np.load(tmp_path / "state.npz", allow_pickle=False) as archive:
        members = {name: archive[name] for name in archive.files}  # each loads without pickle
    header = json.loads(members.pop(codec.HEADER).tobytes())
    assert (header["magic"], header["version"]) == (codec.MAGIC, codec.VERSION) == (
        "fedsim-state", 1)
    assert all(not array.dtype.hasobject for array in members.values())


def test_restored_generators_draw_what_the_saved_ones_would(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    back = round_trip(checkpoint.rng_state(), tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.restore_rng(back)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class Colourless(enum.Enum):  # hashable, not registered
    NONE = 0


def test_a_value_that_cannot_be_stored_is_named(tmp_path):
    for value, where in [({"strategy": {"clock": [1, Unregistered()]}},
                          r"\.strategy\.clock\[1\]"),
                         ({"s": {1, Colourless.NONE}}, r"\.s\[\d\]"),
                         ({"f": lambda: 0}, r"\.f"), ({"o": np.array([object()])}, r"\.o"),
                         ({"p": nn.Parameter(torch.ones(1))}, r"\.p")]:
        with pytest.raises(ConfigError, match=rf"cannot store objects{where}: a .* is not a "
                                              r"plain value.*@fedsim.codec.allow_class"):
            codec.dump({"objects": value}, io.BytesIO())


# ---- files that are not ours, or tampered with ------------------------------------------


def _write(path: Path, header: dict, arrays: dict) -> None:
    text = json.dumps(header).encode()
    with open(path, "wb") as out:
        np.savez(out, **{codec.HEADER: np.frombuffer(text, np.uint8)}, **arrays)


def _tampered(tmp_path: Path, change) -> Path:
    """A valid file of `VALUES`, its header and arrays changed by `change(header, arrays)`."""
    good = tmp_path / "good.npz"
    with open(good, "wb") as out:
        codec.dump({"value": VALUES}, out)
    with np.load(good, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = json.loads(arrays.pop(codec.HEADER).tobytes())
    change(header, arrays)
    bad = tmp_path / "bad.npz"
    _write(bad, header, arrays)
    return bad


def _retag(node, old: str, new: dict) -> bool:
    """Replace the first node tagged `old` in a header tree by `new`; whether one was."""
    if isinstance(node, dict):
        for key, child in node.items():
            if isinstance(child, dict) and child.get(codec.TAG) == old:
                node[key] = new
                return True
            if _retag(child, old, new):
                return True
    if isinstance(node, list):
        for i, child in enumerate(node):
            if isinstance(child, dict) and child.get(codec.TAG) == old:
                node[i] = new
                return True
            if _retag(child, old, new):
                return True
    return False


TAMPERED = {
    "unknown tag": (lambda h, a: _retag(h, "tuple", {"#": "os.system", "v": ["touch x"]}),
                    r"unknown tag 'os.system'"),
    "class not allowed": (
        lambda h, a: _retag(h, "object", {"#": "object", "class": "evil_module_25.Bomb",
                                          "v": {}}),
        r"class 'evil_module_25.Bomb' is not one fedsim may rebuild"),
    "an allowed class under another tag": (
        lambda h, a: _retag(h, "object", {"#": "enum", "class": "fedsim.clock.VirtualClock",
                                          "name": "now"}),
        r"class 'fedsim.clock.VirtualClock' is not one fedsim may rebuild"),
    "missing array": (lambda h, a: a.pop("a3"), r"array 'a3' is missing"),
    "torch dtype not allowed": (
        lambda h, a: _retag(h, "tensor", {"#": "tensor", "dtype": "load", "shape": [1],
                                          "a": "a0"}),
        r"a malformed 'tensor' value \(KeyError: 'load'\)"),
    "malformed node": (lambda h, a: _retag(h, "tuple", {"#": "tuple", "v": 3}),
                       r"a malformed 'tuple' value"),
    "wrong version": (lambda h, a: h.update(version=2),
                      r"it has format version 2; this fedsim reads version 1"),
    "no magic": (lambda h, a: h.update(magic="something-else"),
                 r"it is not a fedsim file \(no magic tag\)"),
    "missing section": (lambda h, a: h["sections"].pop("value"), r"it has no value"),
}


@pytest.mark.parametrize("case", list(TAMPERED), ids=list(TAMPERED))
def test_a_tampered_file_is_refused_with_one_line_naming_it(case, tmp_path):
    change, what = TAMPERED[case]
    bad = _tampered(tmp_path, change)
    with pytest.raises(ConfigError, match=rf"^cannot load '{bad}': {what}") as err:
        codec.load(bad, ["value"])
    assert "\n" not in str(err.value)
    assert "evil_module_25" not in sys.modules  # a class name read from a file is not imported


class Bomb:
    """Unpickling it creates `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_files_that_are_not_ours_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    bomb = pickle.dumps(Bomb(marker))
    pickle.loads(pickle.dumps(Bomb(tmp_path / "works")))
    assert (tmp_path / "works").exists()  # the bomb is real
    cases = {
        "a pickle named .npz": bomb,
        "an empty file": b"",
        "random bytes": b"\x93NUMPY garbage",
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=rf"^cannot load '{path}': "):
            codec.load(path)
    single = tmp_path / "single.npz"
    with open(single, "wb") as out:
        np.save(out, np.ones(3))
    with pytest.raises(ConfigError, match="a single numpy array, not a fedsim file"):
        codec.load(single)
    plain = tmp_path / "plain.npz"
    np.savez(plain, x=np.ones(2))
    with pytest.raises(ConfigError, match=r"not a fedsim file \(no header\)"):
        codec.load(plain)
    inside = tmp_path / "inside.npz"  # a valid header, its array a pickled object array
    _write(inside, {"magic": codec.MAGIC, "version": 1,
                    "sections": {"v": {"#": "ndarray", "a": "a0"}}},
           {"a0": np.array([Bomb(marker)], dtype=object)})
    with pytest.raises(ConfigError, match=r"array 'a0' cannot be read"):
        codec.load(inside)
    assert not marker.exists()


# ---- checkpoints of real runs -----------------------------------------------------------


class Interrupted(BaseException):
    """Stands in for a kill after round 3 (the checkpoint is round 2's)."""


def interrupted_run(out: Path, *overrides: str) -> Path:
    cfg = compose([*TINY, f"output_dir={out}", *RUN, *overrides])
    end_of_round = RunRecorder.end_of_round

    def stop(self, server_round, arrays):
        if server_round == 3:
            raise Interrupted
        return end_of_round(self, server_round, arrays)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunRecorder, "end_of_round", stop)
        with pytest.raises(Interrupted):
            run_experiment(cfg)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two interrupted runs, seed 0 and seed 1 (tests copy them before changing them)."""
    base = tmp_path_factory.mktemp("runs")
    return {"seed0": interrupted_run(base / "seed0", "seed=0"),
            "seed1": interrupted_run(base / "seed1", "seed=1")}


@pytest.fixture
def run(runs, tmp_path):
    """`run(name)`: a fresh copy of one of `runs`."""
    def copy(name: str) -> Path:
        return Path(shutil.copytree(runs[name], tmp_path / name))
    return copy


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its content."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file()}


def test_a_checkpoint_round_trips_with_its_config(run):
    run_dir = run("seed0")
    loaded = checkpoint.load(run_dir)
    assert loaded.server_round == 2
    assert loaded.config == checkpoint.run_config(run_dir)
    assert loaded.config["seed"] == 0 and "output_dir" not in loaded.config
    assert not set(checkpoint.RESUMABLE_OVERRIDES) & set(loaded.config)
    assert isinstance(loaded.arrays, ArrayRecord) and loaded.objects["strategy"] is not None
    checkpoint.save(run_dir, loaded)
    again = checkpoint.load(run_dir)
    for field in dataclasses.fields(checkpoint.Checkpoint):
        assert_same(getattr(loaded, field.name), getattr(again, field.name), field.name)


def test_a_checkpoint_copied_from_another_run_is_refused_before_anything_is_touched(run):
    run_dir, other = run("seed0"), run("seed1")
    shutil.copy(other / checkpoint.CHECKPOINT_FILE, run_dir / checkpoint.CHECKPOINT_FILE)
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"^resume: '.*checkpoint.npz' was made under another "
                                          r"config than the run's config.yaml: seed is 1 in "
                                          r"the checkpoint, 0 in the run \(and "
                                          r"partition.seed\); "):
        run_experiment(checkpoint.resumed_config(str(run_dir)))
    assert snapshot(run_dir) == before


def test_a_seed_edited_in_config_yaml_is_refused(run):
    run_dir = run("seed1")
    config = run_dir / checkpoint.CONFIG_FILE
    config.write_text(config.read_text().replace("\nseed: 1\n", "\nseed: 0\n"))
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"seed is 1 in the checkpoint, 0 in the run"):
        run_experiment(checkpoint.resumed_config(str(run_dir)))
    assert snapshot(run_dir) == before
    with pytest.raises(ConfigError, match=r"seed is 1 in the checkpoint, 0 in the run"):
        checkpoint.load(run_dir)


def test_a_checkpoint_must_fit_the_run_s_model(run):
    run_dir = run("seed0")
    cfg = checkpoint.resumed_config(str(run_dir))
    model = model_factory(cfg, build_federated_data(cfg))()
    checkpoint.check_checkpoint(cfg, model)  # its own model fits
    with pytest.raises(ConfigError, match=r"^resume: '.*checkpoint.npz' does not fit this run's "
                                          r"model \(Linear\): its arrays have no weight, no "
                                          r"bias, an unknown net"):
        checkpoint.check_checkpoint(cfg, nn.Linear(2, 3))
    loaded = checkpoint.load(run_dir)
    name = next(iter(loaded.arrays))
    wider = np.zeros((*loaded.arrays[name].shape, 2), np.float32)
    loaded.arrays[name] = Array(wider)
    checkpoint.save(run_dir, loaded)
    with pytest.raises(ConfigError, match=rf"its arrays have {name} of shape "):
        checkpoint.check_checkpoint(cfg, model)


def test_shape_and_config_differences_hand_worked():
    assert checkpoint.shape_differences({"w": (2, 3), "x": (1,)}, {"w": (3, 2), "b": (2,)}) == [
        "no b", "an unknown x", "w of shape (2, 3), not (3, 2)"]
    stored = {"seed": 1, "strategy": {"lr": 0.1, "mu": 1}, "model": "mlp"}
    current = {"seed": 0, "strategy": {"lr": 0.1, "mu": 2, "new": 1}, "model": "mlp"}
    assert checkpoint.config_differences(stored, current) == [
        "seed", "strategy.mu", "strategy.new"]
    assert checkpoint.dotted(stored, "strategy.mu") == 1
    assert checkpoint.dotted(stored, "strategy.new") == "<none>"
    assert checkpoint.experiment_config(
        {"seed": 1, "device": "cpu", "output_dir": "x", "resume": "y"}) == {"seed": 1}


def test_a_legacy_pickle_checkpoint_is_refused_unopened(run, tmp_path):
    run_dir = run("seed0")
    (run_dir / checkpoint.CHECKPOINT_FILE).unlink()
    marker = tmp_path / "pwned"
    (run_dir / checkpoint.LEGACY_CHECKPOINT_FILE).write_bytes(pickle.dumps(Bomb(marker)))
    before = snapshot(run_dir)
    legacy = (r"^resume: '.*checkpoint.pkl' is a pickle, an unsafe legacy checkpoint format "
              r"that fedsim no longer opens .*; restart the run, or resume it with the older "
              r"fedsim that wrote it")
    with pytest.raises(ConfigError, match=legacy):
        run_experiment(checkpoint.resumed_config(str(run_dir)))
    for call in (checkpoint.load, checkpoint.resumable_run_dir):
        with pytest.raises(ConfigError, match=legacy):
            call(str(run_dir))
    assert snapshot(run_dir) == before
    assert not marker.exists()


def test_a_pickle_or_a_truncated_file_named_checkpoint_npz_is_refused(run, tmp_path):
    run_dir = run("seed0")
    path = run_dir / checkpoint.CHECKPOINT_FILE
    whole = path.read_bytes()
    for content in (whole[: len(whole) // 2], whole[:-10], pickle.dumps(Bomb(tmp_path / "x"))):
        path.write_bytes(content)
        before = snapshot(run_dir)
        with pytest.raises(ConfigError, match=rf"^cannot load '{path}': "):
            run_experiment(checkpoint.resumed_config(str(run_dir)))
        assert snapshot(run_dir) == before
    assert not (tmp_path / "x").exists()


def _wrong_version(run_dir: Path) -> None:
    path = run_dir / checkpoint.CHECKPOINT_FILE
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = json.loads(arrays.pop(codec.HEADER).tobytes())
    _write(path, header | {"version": 99}, arrays)


def test_a_checkpoint_of_another_format_version_is_refused(run):
    run_dir = run("seed0")
    _wrong_version(run_dir)
    with pytest.raises(ConfigError, match=r"checkpoint.npz': it has format version 99; this "
                                          r"fedsim reads version 1"):
        run_experiment(checkpoint.resumed_config(str(run_dir)))


def test_a_decodable_but_wrong_checkpoint_is_refused(run):
    run_dir = run("seed0")
    loaded = checkpoint.load(run_dir)
    loaded.rng = {"python": (3, (1, 2), None), "numpy": loaded.rng["numpy"],
                  "torch": loaded.rng["torch"]}
    checkpoint.save(run_dir, loaded)
    with pytest.raises(ConfigError, match=r"checkpoint.npz': rng: ValueError"):
        checkpoint.load(run_dir)
    loaded.rng, loaded.server_round = checkpoint.rng_state(), "2"
    checkpoint.save(run_dir, loaded)
    with pytest.raises(ConfigError, match=r"server_round is a str, not a int"):
        checkpoint.load(run_dir)


# ---- writing ---------------------------------------------------------------------------


def test_a_failed_write_removes_its_temp_file_and_keeps_the_last_checkpoint(run, monkeypatch):
    run_dir = run("seed0")
    path = run_dir / checkpoint.CHECKPOINT_FILE
    before = path.read_bytes()
    loaded = checkpoint.load(run_dir)

    def disk_full(out, *args, **kwargs):
        out.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save(run_dir, loaded)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not path.with_name(path.name + ".tmp").exists()
    loaded.objects["strategy"]["thing"] = Unregistered()
    with pytest.raises(ConfigError, match=r"cannot store objects\.strategy\.thing: a "
                                          r"\S*Unregistered is not a plain value"):
        checkpoint.save(run_dir, loaded)
    assert path.read_bytes() == before
    assert sorted(p.name for p in run_dir.glob("checkpoint*")) == [checkpoint.CHECKPOINT_FILE]


def test_the_checkpoint_keeps_objects_of_fedsim_s_classes(tmp_path):
    """FedBuff's state holds a virtual clock, dispatches and stale updates: all rebuilt, the
    strategy's state equal to what was saved (compared as stored)."""
    run_dir = interrupted_run(tmp_path / "fedbuff", "strategy=fedbuff",
                              "strategy.concurrency=4", "strategy.buffer_size=2",
                              "devices=fixed", "devices.delay=2", "devices.fraction=0.5")
    cfg = checkpoint.resumed_config(str(run_dir))
    checkpoint.check_checkpoint(cfg, model_factory(cfg, build_federated_data(cfg))())
    strategy = checkpoint.load(run_dir).objects["strategy"]
    assert isinstance(strategy["clock"], VirtualClock)
    with np.load(run_dir / checkpoint.CHECKPOINT_FILE, allow_pickle=False) as archive:
        header = archive[codec.HEADER].tobytes().decode()
    for name in ("fedsim.clock.VirtualClock", "fedsim.strategies.stale.Dispatch"):
        assert f'"class":"{name}"' in header

    class Holder:
        pass

    holder = Holder()
    vars(holder).update(strategy)
    assert changed_attributes(holder, strategy) == []
    holder.clock = VirtualClock()
    assert changed_attributes(holder, strategy) == ["clock"]
