"""A run's state as tagged JSON plus numpy arrays, in one `.npz` file that is safe to load.

Loading a pickle runs whatever code its author put in it; a fedsim state file holds only
data. `dump` writes named sections (a checkpoint's round, arrays, strategy state...) as
one JSON header, the `HEADER` entry, next to the arrays it refers to (`a0`, `a1`, ...);
`load` reads them back with `np.load(allow_pickle=False)`.

In the JSON, str, int, bool, None, finite floats and lists are themselves; every other
value is an object whose `"#"` tag names its kind: dict, tuple, set (items in an order
fixed by their content), numpy arrays and scalars, torch tensors, bytes, Flower's records,
and instances of the classes this module allows. Those are reconstructed only from an
explicit allowlist: fedsim's own classes (`PROJECT_CLASSES`) and the ones registered with
`@allow_class` by their module. No name read from a file is ever imported. Anything else
(an unknown tag or class, a missing array, another format version, a file that is not this
format) is a `ConfigError` naming the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import json
import math
import zipfile
import zlib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsim.errors import ConfigError

MAGIC = "fedsim-state"
VERSION = 1
HEADER = "__fedsim__"
TAG = "#"
#: fedsim's classes that a state may hold ("module:qualname"), imported from here on need
PROJECT_CLASSES = (
    "fedsim.clock:Arrival",
    "fedsim.clock:VirtualClock",
    "fedsim.strategies.stale:Dispatch",
    "fedsim.strategies.stale:StaleUpdate",
)
#: torch dtypes a tensor may have, by name (the file names one; never looked up in torch)
TORCH_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                  torch.float16, torch.bfloat16, torch.float32, torch.float64,
                  torch.complex64, torch.complex128)
}
NON_FINITE = ("nan", "inf", "-inf")
#: numpy scalar kinds kept in the JSON (bool, signed, unsigned, floating); others: 0-d arrays
JSON_SCALAR_KINDS = "biuf"
READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)

Arrays = dict[str, np.ndarray]
T = TypeVar("T", bound=type)

_ALLOWED: dict[str, type] = {}


class MalformedError(Exception):
    """What is wrong with a file being decoded (`load` reports it with the file's name)."""


class UnsupportedError(Exception):
    """A value `encode` cannot store; `where` collects its path, innermost key first."""

    def __init__(self, value: object) -> None:
        super().__init__(value)
        self.value = value
        self.where: list[str] = []


# ---- the allowlist ----------------------------------------------------------------------


def qualified_name(cls: type) -> str:
    """`module.QualName` of a class: how a file names it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def allow_class(cls: T) -> T:
    """Class decorator: instances of `cls` (a dataclass, a plain class whose attributes are
    its state, or an Enum) may be stored and rebuilt. Rebuilding sets the stored attributes
    on `cls.__new__(cls)` without calling `__init__`."""
    _ALLOWED[qualified_name(cls)] = cls
    return cls


def _resolve(entry: str) -> type:
    """The class a `PROJECT_CLASSES` entry names (a constant of this module, not a file's)."""
    module_name, qualname = entry.split(":")
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def allowed_class(name: str) -> type | None:
    """The allowed class called `name`, or None."""
    if name not in _ALLOWED:
        for entry in PROJECT_CLASSES:
            if entry.replace(":", ".") == name:
                allow_class(_resolve(entry))
    return _ALLOWED.get(name)


def _allowed_name(cls: type) -> str | None:
    name = qualified_name(cls)
    return name if allowed_class(name) is cls else None


# ---- encoding ---------------------------------------------------------------------------


def encode(value: Any, arrays: Arrays | None = None, name: str = "") -> tuple[Any, Arrays]:
    """`value` as a JSON-able tree and the arrays it refers to (added to `arrays`, if given);
    `ConfigError` naming the first part of it (under `name`) that cannot be stored."""
    arrays = {} if arrays is None else arrays
    try:
        return _child(value, arrays, name), arrays
    except UnsupportedError as err:
        raise ConfigError(_unsupported_line(err)) from None


def _unsupported_line(err: UnsupportedError) -> str:
    where = "".join(reversed(err.where)).lstrip(".") or "the value"
    kind = type(err.value)
    return (f"cannot store {where}: a {qualified_name(kind)} is not a plain value (dicts, "
            "lists, numbers, arrays, tensors, Flower records; register a class of yours with "
            "@fedsim.codec.allow_class, or leave it out of the checkpoint with "
            "not_checkpointed)")


def _encode(value: Any, arrays: Arrays) -> Any:
    kind = type(value)
    if kind in (str, int, bool, type(None)):
        return value
    if kind is float:
        return value if math.isfinite(value) else {TAG: "float", "v": repr(value)}
    encoder = ENCODERS.get(kind)
    if encoder is not None:
        return encoder(value, arrays)
    if isinstance(value, np.generic):
        return _numpy_scalar(value, arrays)
    name = _allowed_name(kind)
    if name is None:
        raise UnsupportedError(value)
    if isinstance(value, enum.Enum):
        return {TAG: "enum", "class": name, "name": value.name}
    return {TAG: "object", "class": name, "v": _str_dict(_attributes(value), arrays)}


def fingerprint(value: Any) -> str:
    """A digest of `value`'s encoding: equal for values that are stored alike."""
    return _digest(*encode(value))


def _digest(tree: Any, arrays: Arrays) -> str:
    digest = hashlib.sha256(json.dumps(tree, allow_nan=False, sort_keys=True).encode())
    for name, array in sorted(arrays.items()):
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _content_order(values: Collection[Any]) -> list[Any]:
    """A set's items sorted by their encoding's digest, so that equal sets encode alike.

    A set iterates in an order that depends on its insertion history and, for strings and
    bytes, on the process's hash seed; encoded in that order, one set would be stored (and
    fingerprinted) differently by two processes. An item that cannot be stored keeps the
    set's order, and encoding it then fails with its path. Each item is encoded twice (once
    for its digest): cheap for the small sets a run's state holds."""
    try:
        return sorted(values, key=_item_digest)
    except UnsupportedError:
        return list(values)


def _item_digest(item: Any) -> str:
    arrays: Arrays = {}
    return _digest(_encode(item, arrays), arrays)


def _child(value: Any, arrays: Arrays, key: str) -> Any:
    """`_encode(value)`, adding `key` to the path of a value it cannot store."""
    try:
        return _encode(value, arrays)
    except UnsupportedError as err:
        err.where.append(key)
        raise


def _store(array: np.ndarray, arrays: Arrays) -> str:
    """Add `array` to the file's arrays; its name there."""
    if array.dtype.hasobject:
        raise UnsupportedError(array)
    name = f"a{len(arrays)}"
    arrays[name] = array
    return name


def _items(values: Collection[Any], arrays: Arrays) -> list[Any]:
    return [_child(v, arrays, f"[{i}]") for i, v in enumerate(values)]


def _str_dict(values: Mapping[str, Any], arrays: Arrays) -> dict[str, Any]:
    return {k: _child(v, arrays, f".{k}") for k, v in values.items()}


def _dict(value: dict, arrays: Arrays) -> dict[str, Any]:
    if all(type(k) is str for k in value):
        return {TAG: "dict", "v": _str_dict(value, arrays)}
    return {TAG: "kdict", "v": [[_child(k, arrays, f"[{k!r}]"), _child(v, arrays, f"[{k!r}]")]
                               for k, v in value.items()]}


def _sequence(tag: str) -> Callable[[Any, Arrays], dict[str, Any]]:
    return lambda value, arrays: {TAG: tag, "v": _items(value, arrays)}


def _unordered(tag: str) -> Callable[[Any, Arrays], dict[str, Any]]:
    return lambda value, arrays: {TAG: tag, "v": _items(_content_order(value), arrays)}


def _record(tag: str) -> Callable[[Any, Arrays], dict[str, Any]]:
    return lambda value, arrays: {TAG: tag, "v": _str_dict(value, arrays)}


def _ndarray(value: np.ndarray, arrays: Arrays) -> dict[str, Any]:
    return {TAG: "ndarray", "a": _store(value, arrays)}


def _numpy_scalar(value: np.generic, arrays: Arrays) -> dict[str, Any]:
    """A numpy scalar: its dtype and Python value, or a 0-d array (strings, long doubles)."""
    dtype = value.dtype
    if dtype.kind in JSON_SCALAR_KINDS and dtype.itemsize <= 8:
        return {TAG: "npscalar", "dtype": dtype.str, "v": _encode(value.item(), arrays)}
    return {TAG: "npvalue", "a": _store(np.asarray(value), arrays)}


def _tensor(value: torch.Tensor, arrays: Arrays) -> dict[str, Any]:
    """A tensor as its raw bytes (exact for every dtype, bfloat16 included), on the CPU."""
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype not in TORCH_DTYPES:
        raise UnsupportedError(value)
    flat = value.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)
    node = {TAG: "tensor", "dtype": dtype, "shape": list(value.shape), "a": _store(raw, arrays)}
    return node | ({"grad": True} if value.requires_grad else {})


def _bytes(value: bytes, arrays: Arrays) -> dict[str, Any]:
    return {TAG: "bytes", "a": _store(np.frombuffer(value, np.uint8), arrays)}


def _array(value: Array, arrays: Arrays) -> dict[str, Any]:
    """A Flower `Array`: its fields, its serialized data as bytes."""
    return {TAG: "Array", "dtype": value.dtype, "shape": list(value.shape),
            "stype": value.stype, "a": _store(np.frombuffer(value.data, np.uint8), arrays)}


def _attributes(value: object) -> dict[str, Any]:
    """An allowed object's state: its attributes (a slotted dataclass: its fields)."""
    if hasattr(value, "__dict__"):
        return vars(value)
    if dataclasses.is_dataclass(value):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    raise UnsupportedError(value)


ENCODERS: dict[type, Callable[[Any, Arrays], Any]] = {
    dict: _dict,
    list: lambda value, arrays: _items(value, arrays),
    tuple: _sequence("tuple"),
    set: _unordered("set"),
    frozenset: _unordered("frozenset"),
    bytes: _bytes,
    np.ndarray: _ndarray,
    torch.Tensor: _tensor,
    Array: _array,
    ArrayRecord: _record("ArrayRecord"),
    ConfigRecord: _record("ConfigRecord"),
    MetricRecord: _record("MetricRecord"),
    RecordDict: _record("RecordDict"),
}


# ---- decoding ---------------------------------------------------------------------------


def decode(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """The value `encode` made `tree` of; `MalformedError` saying what is wrong with it."""
    try:
        return _decode(tree, arrays)
    except RecursionError:
        raise MalformedError("its values are nested too deeply") from None


def _decode(node: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(node, list):
        return [_decode(item, arrays) for item in node]
    if not isinstance(node, dict):
        return node
    tag = node.get(TAG)
    decoder = DECODERS.get(tag) if isinstance(tag, str) else None
    if decoder is None:
        raise MalformedError(f"unknown tag {tag!r}")
    try:
        return decoder(node, arrays)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as err:
        raise MalformedError(f"a malformed {tag!r} value ({type(err).__name__}: {err})") from None


def _values(node: dict, arrays: Mapping[str, np.ndarray]) -> list[Any]:
    items = node["v"]
    if not isinstance(items, list):
        raise TypeError("its values are not a list")
    return [_decode(item, arrays) for item in items]


def _named(node: dict, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    items = node["v"]
    if not isinstance(items, dict):
        raise TypeError("its values are not a JSON object")
    return {k: _decode(v, arrays) for k, v in items.items()}


def _stored(node: dict, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The array a node refers to."""
    name = node["a"]
    if not isinstance(name, str) or name not in arrays:
        raise MalformedError(f"array {name!r} is missing")
    try:
        return arrays[name]
    except READ_ERRORS as err:
        raise MalformedError(f"array {name!r} cannot be read ({err})") from None


def _raw_bytes(node: dict, arrays: Mapping[str, np.ndarray]) -> bytes:
    data = _stored(node, arrays)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise TypeError(f"its data is {data.dtype} of shape {data.shape}, not bytes")
    return data.tobytes()


def _shape(node: dict) -> tuple[int, ...]:
    shape = node["shape"]
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise TypeError(f"shape {shape!r}")
    return tuple(shape)


def _decode_float(node: dict, arrays: Mapping[str, np.ndarray]) -> float:
    if node["v"] not in NON_FINITE:
        raise ValueError(f"{node['v']!r} is not one of {NON_FINITE}")
    return float(node["v"])


def _decode_kdict(node: dict, arrays: Mapping[str, np.ndarray]) -> dict:
    return {key: value for key, value in _values(node, arrays)}


def _decode_npscalar(node: dict, arrays: Mapping[str, np.ndarray]) -> np.generic:
    dtype, value = np.dtype(node["dtype"]), _decode(node["v"], arrays)
    if dtype.kind not in JSON_SCALAR_KINDS or type(value) not in (bool, int, float):
        raise TypeError(f"{value!r} of dtype {dtype} is not a number")
    return dtype.type(value)


def _decode_npvalue(node: dict, arrays: Mapping[str, np.ndarray]) -> np.generic:
    value = _stored(node, arrays)
    if value.ndim != 0:
        raise TypeError(f"a scalar of shape {value.shape}")
    return value[()]


def _decode_tensor(node: dict, arrays: Mapping[str, np.ndarray]) -> torch.Tensor:
    dtype, shape = TORCH_DTYPES[node["dtype"]], _shape(node)
    raw = _raw_bytes(node, arrays)
    flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    tensor = flat.reshape(shape)
    return tensor.requires_grad_() if node.get("grad") is True else tensor


def _decode_array(node: dict, arrays: Mapping[str, np.ndarray]) -> Array:
    fields = {"dtype": node["dtype"], "stype": node["stype"]}
    if not all(isinstance(v, str) for v in fields.values()):
        raise TypeError(f"dtype/stype {fields}")
    return Array(**fields, shape=_shape(node), data=_raw_bytes(node, arrays))


def _decode_array_record(node: dict, arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for name, array in _named(node, arrays).items():
        record[name] = array
    return record


def _decode_class(node: dict, want_enum: bool) -> type:
    name = node["class"]
    cls = allowed_class(name) if isinstance(name, str) else None
    if cls is None or issubclass(cls, enum.Enum) != want_enum:
        raise MalformedError(f"class {name!r} is not one fedsim may rebuild")
    return cls


def _decode_object(node: dict, arrays: Mapping[str, np.ndarray]) -> object:
    cls = _decode_class(node, want_enum=False)
    value = cls.__new__(cls)
    for name, attribute in _named(node, arrays).items():
        object.__setattr__(value, name, attribute)
    return value


def _decode_enum(node: dict, arrays: Mapping[str, np.ndarray]) -> enum.Enum:
    return _decode_class(node, want_enum=True)[node["name"]]


def _record_decoder(cls: type) -> Callable[[dict, Mapping[str, np.ndarray]], Any]:
    return lambda node, arrays: cls(_named(node, arrays))


DECODERS: dict[str, Callable[[dict, Mapping[str, np.ndarray]], Any]] = {
    "float": _decode_float,
    "dict": _named,
    "kdict": _decode_kdict,
    "tuple": lambda node, arrays: tuple(_values(node, arrays)),
    "set": lambda node, arrays: set(_values(node, arrays)),
    "frozenset": lambda node, arrays: frozenset(_values(node, arrays)),
    "bytes": _raw_bytes,
    "ndarray": _stored,
    "npscalar": _decode_npscalar,
    "npvalue": _decode_npvalue,
    "tensor": _decode_tensor,
    "Array": _decode_array,
    "ArrayRecord": _decode_array_record,
    "ConfigRecord": _record_decoder(ConfigRecord),
    "MetricRecord": _record_decoder(MetricRecord),
    "RecordDict": _record_decoder(RecordDict),
    "object": _decode_object,
    "enum": _decode_enum,
}


# ---- files ------------------------------------------------------------------------------


def dump(sections: Mapping[str, Any], out: BinaryIO) -> None:
    """Write named `sections` to `out` as one `.npz` archive (no pickles in it)."""
    arrays: Arrays = {}
    trees = {name: encode(value, arrays, name)[0] for name, value in sections.items()}
    header = {"magic": MAGIC, "version": VERSION, "sections": trees}
    text = json.dumps(header, allow_nan=False, separators=(",", ":"))
    np.savez(out, allow_pickle=False, **{HEADER: np.frombuffer(text.encode(), np.uint8)},
             **arrays)


def load(path: Path, names: Collection[str] | None = None) -> dict[str, Any]:
    """The sections `dump` wrote to `path` (only `names`, if given): `ConfigError` naming
    the file and what is wrong when it is not a readable file of this format."""
    try:
        with _open(path) as archive:
            trees = _sections(_header(archive))
            wanted = list(trees) if names is None else list(names)
            missing = [name for name in wanted if name not in trees]
            if missing:
                raise MalformedError(f"it has no {', '.join(missing)}")
            return {name: decode(trees[name], archive) for name in wanted}
    except MalformedError as err:
        raise ConfigError(f"cannot load '{path}': {err}") from None
    except READ_ERRORS as err:
        raise ConfigError(f"cannot load '{path}': it is damaged or not a fedsim file "
                          f"({type(err).__name__}: {err})") from None


def _open(path: Path) -> np.lib.npyio.NpzFile:
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise MalformedError("it is a single numpy array, not a fedsim file")
    return archive


def _header(archive: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The archive's JSON header, checked for the magic tag and the format version."""
    if HEADER not in archive:
        raise MalformedError("it is not a fedsim file (no header)")
    raw = archive[HEADER]
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise MalformedError(f"its header is not JSON ({err})") from None
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise MalformedError("it is not a fedsim file (no magic tag)")
    if header.get("version") != VERSION:
        raise MalformedError(f"it has format version {header.get('version')!r}; this fedsim reads "
                        f"version {VERSION} (use the fedsim that wrote it)")
    return header


def _sections(header: dict[str, Any]) -> dict[str, Any]:
    sections = header.get("sections")
    if not isinstance(sections, dict):
        raise MalformedError("its header has no sections")
    return sections
