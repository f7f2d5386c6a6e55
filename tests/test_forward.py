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
