import pytest
import torch

from titans.models.architectures import MLP
from titans.models.loading import ModelLoadError, count_parameters, load_model, save_torchscript


def test_the_three_model_formats_load_and_agree(tmp_path):
    torch.manual_seed(0)
    model = MLP(5, 3, (4,)).eval()
    x = torch.randn(7, 5)
    expected = model(x)

    save_torchscript(model, str(tmp_path / "m.pt"))
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(exported, str(tmp_path / "m.pt2"))
    torch.save(model.state_dict(), tmp_path / "sd.pt")

    for loaded in (load_model(str(tmp_path / "m.pt")),
                   load_model(str(tmp_path / "m.pt2")),
                   load_model(str(tmp_path / "sd.pt"), "titans.models.architectures:MLP",
                              {"in_features": 5, "out_features": 3, "hidden": [4]})):
        with torch.inference_mode():
            torch.testing.assert_close(loaded(x), expected)
    assert count_parameters(load_model(str(tmp_path / "m.pt"))) == 5 * 4 + 4 + 4 * 3 + 3


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot read model file"):
        load_model(str(tmp_path / "missing.pt"))
    with pytest.raises(ModelLoadError, match="cannot import model class"):
        load_model(__file__, "no.such.module:Thing")
