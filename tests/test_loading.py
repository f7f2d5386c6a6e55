import json

import pytest
import torch

from titans.models.architectures import MLP
from titans.models.loading import ModelLoadError, ModelRef, count_parameters, load_model
from titans.transforms.io.models import load_model_file, save_torchscript


def test_the_three_model_formats_load_and_agree(tmp_path):
    torch.manual_seed(0)
    model = MLP(5, 3, (4,)).eval()
    x = torch.randn(7, 5)
    expected = model(x)

    save_torchscript(model, str(tmp_path / "m.pt"))
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(exported, str(tmp_path / "m.pt2"))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    kwargs = json.dumps({"in_features": 5, "out_features": 3, "hidden": [4]})

    for loaded in (load_model_file(str(tmp_path / "m.pt")),
                   load_model_file(str(tmp_path / "m.pt2")),
                   load_model_file(ModelRef(str(tmp_path / "sd.pt"),
                                            "titans.models.architectures:MLP", kwargs)),
                   load_model((tmp_path / "m.pt").read_bytes())):
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), expected)
    assert count_parameters(load_model_file(str(tmp_path / "m.pt"))) == 5 * 4 + 4 + 4 * 3 + 3


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot read model file"):
        load_model_file(str(tmp_path / "missing.pt"))
    with pytest.raises(ModelLoadError, match="cannot import model class"):
        load_model_file(ModelRef(__file__, "no.such.module:Thing"))
    with pytest.raises(ModelLoadError, match=r"cannot load model 'upload': not a TorchScript"):
        load_model(b"not a model", name="upload")


def test_models_layer_takes_bytes_not_paths(tmp_path):
    """titans.models reads no file: a path handed to load_model is a mistake, said as one."""
    with pytest.raises(TypeError, match="load_model_file reads a path"):
        load_model(str(tmp_path / "m.pt"))
