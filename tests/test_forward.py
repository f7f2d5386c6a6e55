"""One forward helper for every place that runs a model over a whole matrix."""
import numpy as np
import pytest
import torch

from titans.models.forward import forward_in_chunks


class Recorder(torch.nn.Module):
    """Doubles its input in float64 and remembers the batch sizes it saw."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(len(x))
        assert not torch.is_grad_enabled()
        return (2 * x).double()


def test_chunks_are_bounded_and_logits_float32_on_cpu_in_row_order():
    x = np.arange(21, dtype=np.float32).reshape(7, 3)
    model = Recorder()
    out = forward_in_chunks(model, x, chunk=3)
    assert model.sizes == [3, 3, 1]
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out, torch.from_numpy(2 * x))


def test_read_only_and_non_float32_input():
    x = np.ones((4, 2), dtype=np.float64)
    x.setflags(write=False)  # Arrow-backed matrices are read-only
    assert torch.equal(forward_in_chunks(Recorder(), x, chunk=10), torch.full((4, 2), 2.0))


def test_empty_input_and_bad_chunk():
    assert forward_in_chunks(Recorder(), np.zeros((0, 3), np.float32), chunk=4).shape == (0, 0)
    with pytest.raises(ValueError, match="chunk"):
        forward_in_chunks(Recorder(), np.zeros((2, 3), np.float32), chunk=0)


# ------------------------------------------------------------------ isolate_failures (issue 20)

from titans.models.forward import is_infrastructure, isolate_failures  # noqa: E402


def _model(fail):
    """forward(x) = 2x, raising ``fail(x)`` when it returns an exception."""
    def forward(x):
        error = fail(x)
        if error is not None:
            raise error
        return 2 * x
    return forward


def test_rows_that_fail_alone_are_singled_out_and_the_rest_scored():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    out, errors = isolate_failures(_model(lambda b: ValueError("bad row") if (b[:, 0] == 14).any()
                                          else None), x)
    assert sorted(errors) == [7] and "ValueError: bad row" in errors[7]
    np.testing.assert_array_equal(np.delete(out, 7, 0), np.delete(2 * x, 7, 0))


@pytest.mark.parametrize("error", [ConnectionError("lost"), BrokenPipeError(32, "pipe"),
                                   EOFError(), MemoryError(), TimeoutError("slow"),
                                   RuntimeError("CUDA error: an illegal memory access"),
                                   RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling")])
def test_infrastructure_errors_propagate_from_any_forward(error):
    assert is_infrastructure(error)
    x = np.zeros((16, 2), np.float32)
    with pytest.raises(type(error)):  # on the whole batch
        isolate_failures(_model(lambda b: error), x)
    calls = []

    def later(b):  # the whole batch fails for a row's reason, then the machine goes
        calls.append(len(b))
        return ValueError("row") if len(calls) == 1 else error
    with pytest.raises(type(error)):
        isolate_failures(_model(later), x)


def test_cuda_out_of_memory_is_split_not_raised_nor_dead_lettered():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not is_infrastructure(oom)
    assert not is_infrastructure(RuntimeError("shape mismatch: cannot score this row"))
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    out, errors = isolate_failures(_model(lambda b: oom if len(b) > 16 else None), x)
    assert errors == {} and np.array_equal(out, 2 * x)


def test_a_model_failing_on_every_probe_row_gives_no_outputs():
    out, errors = isolate_failures(_model(lambda b: RuntimeError("broken")),
                                   np.zeros((9, 2), np.float32))
    assert out is None and len(errors) == 9 and "each of 3 rows tried alone" in errors[0]
