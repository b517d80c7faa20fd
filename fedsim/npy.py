"""Flower's array bytes (an NPY file per `Array`), written and read without `np.save` /
`np.load`: their header parsing is most of the cost of a small model's message."""

from __future__ import annotations

import io
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY


@lru_cache(maxsize=256)
def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The NPY header `np.save` (what Flower's `Array` uses) writes for a C-order array."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": dtype, "fortran_order": False,
                                                  "shape": shape})
    return header.getvalue()


def to_array(values: np.ndarray) -> Array:
    """`Array(values)` with the header written once per shape and dtype: the same bytes
    for a C-ordered array (others are stored C-ordered, with the same values)."""
    values = np.asarray(values, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
    if values.dtype.hasobject or values.dtype.fields is not None:
        return Array(values)  # np.save's own path for what a header cache does not cover
    header = npy_header(values.shape, np.lib.format.dtype_to_descr(values.dtype))
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=NUMPY_STYPE,
                 data=header + values.tobytes())


def array_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """`ArrayRecord(state)` of a torch state dict (`to_array` for each entry)."""
    return ArrayRecord({k: to_array(v.detach().cpu().numpy()) for k, v in state.items()})
