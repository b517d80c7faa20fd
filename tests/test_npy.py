"""fedsim.npy: Flower's array bytes written without np.save."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsim.npy import array_record, to_array


@pytest.mark.parametrize("values", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(5, dtype=np.int64),
    np.array(3.5, dtype=np.float64),  # 0-d
    np.zeros((2, 0, 3), dtype=np.float16),
    np.array([True, False]),
    np.arange(6, dtype=">i4"),  # big-endian: the header names the byte order
])
def test_the_bytes_are_flowers_own(values):
    mine, theirs = to_array(values), Array(values)
    assert (mine.dtype, mine.shape, mine.stype, mine.data) == (
        theirs.dtype, theirs.shape, theirs.stype, theirs.data)
    np.testing.assert_array_equal(mine.numpy(), values)


def test_a_fortran_ordered_array_keeps_its_values():
    values = np.arange(6, dtype=np.float32).reshape(2, 3).T
    assert values.flags.f_contiguous and not values.flags.c_contiguous
    np.testing.assert_array_equal(to_array(values).numpy(), values)


def test_a_state_dict_record_equals_flowers():
    state = torch.nn.Linear(3, 2).state_dict()
    mine, theirs = array_record(state), ArrayRecord(state)
    assert list(mine) == list(theirs)
    assert all(mine[k].data == theirs[k].data for k in theirs)
