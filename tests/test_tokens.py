import numpy as np
import pyarrow as pa
import pytest

from titans.transforms.tokens import token_matrix


def test_rows_are_padded_to_the_longest_sequence():
    col = pa.chunked_array([pa.array([[5, 6, 7], [1]], pa.list_(pa.int32())),
                            pa.array([[], [9, 8]], pa.list_(pa.int32()))])
    m, reasons = token_matrix(col, pad_id=-1)
    assert reasons is None and m.dtype == np.int64
    np.testing.assert_array_equal(m, [[5, 6, 7], [1, -1, -1], [-1, -1, -1], [9, 8, -1]])


def test_nulls_and_overflow_get_reasons_and_padding():
    col = pa.array([[1, 2], None, [3, None], [4, 5, 6, 7], [8]], pa.large_list(pa.int64()))
    m, reasons = token_matrix(col, max_length=3)
    assert reasons.tolist() == [None, "null token sequence", "null token in the sequence",
                                "token sequence has 4 tokens, more than max_length 3", None]
    np.testing.assert_array_equal(m, [[1, 2], [0, 0], [0, 0], [0, 0], [8, 0]])
    m, reasons = token_matrix(col, max_length=3, overflow="truncate")
    np.testing.assert_array_equal(m[3], [4, 5, 6])
    assert reasons[3] is None and reasons[1] == "null token sequence"


def test_sliced_and_fixed_size_columns():
    col = pa.array([[1, 2, 3], [4, 5], [6]]).slice(1)
    np.testing.assert_array_equal(token_matrix(col)[0], [[4, 5], [6, 0]])
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6)), 2).slice(1)
    np.testing.assert_array_equal(token_matrix(fixed)[0], [[2, 3], [4, 5]])
    with pytest.raises(ValueError, match="list of integers"):
        token_matrix(pa.array([[1.0]]))


def test_matches_a_plain_loop_on_random_sequences():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 1000, rng.integers(0, 40))) if rng.random() > 0.1 else None
            for _ in range(500)]
    m, reasons = token_matrix(pa.array(seqs, pa.list_(pa.int64())), pad_id=0, max_length=32,
                              overflow="truncate")
    for i, s in enumerate(seqs):
        expected = ([] if s is None else s[:32])
        assert m[i, :len(expected)].tolist() == expected and not m[i, len(expected):].any()
        assert (reasons[i] is None) == (s is not None)
