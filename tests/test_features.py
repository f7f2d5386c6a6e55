import numpy as np
import pyarrow as pa
import pytest

from titans.transforms.features import feature_matrix, resolve_feature_spec


def test_fixed_size_vector_is_read_without_reasons():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = pa.table({"f": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)})
    spec = resolve_feature_spec(t.schema, ("f",))
    m, reasons = feature_matrix(t, spec)
    assert spec.dim == 4 and reasons is None
    np.testing.assert_array_equal(m, x)


def test_bad_vectors_get_a_reason_and_a_zero_row():
    t = pa.table({"f": pa.array([[1.0, 2.0], [3.0, None], None, [1.0, 2.0, 3.0], [np.nan, 1.0],
                                 [5.0, 6.0]])})
    spec = resolve_feature_spec(t.schema, ("f",), first_vector_length=2)
    m, reasons = feature_matrix(t, spec)
    assert reasons[0] is None and reasons[5] is None
    assert "NaN" in reasons[1] and "null feature vector" in reasons[2]
    assert "length 3, expected 2" in reasons[3] and "NaN" in reasons[4]
    np.testing.assert_array_equal(m[[0, 5]], [[1, 2], [5, 6]])
    assert not m[1:5].any()


def test_scalar_columns_are_concatenated_in_order():
    t = pa.table({"a": [1, 2, None], "b": [0.5, 1.5, 2.5], "c": [True, False, True]})
    spec = resolve_feature_spec(t.schema, ("b", "a"))
    m, reasons = feature_matrix(t, spec)
    np.testing.assert_array_equal(m[:2], [[0.5, 1], [1.5, 2]])
    assert reasons[:2].tolist() == [None, None] and "['a']" in reasons[2]


def test_spec_errors_say_what_to_fix():
    schema = pa.schema([("f", pa.list_(pa.string())), ("s", pa.string()), ("x", pa.float32())])
    with pytest.raises(ValueError, match="not in the input.*--feature-columns"):
        resolve_feature_spec(schema, ("nope",))
    with pytest.raises(ValueError, match="list of string"):
        resolve_feature_spec(schema, ("f",))
    with pytest.raises(ValueError, match="must be numbers"):
        resolve_feature_spec(schema, ("x", "s"))
