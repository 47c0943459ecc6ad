"""torchvision imported through utils/vision.py: an unmatched torch/torchvision pair is one line naming
the release to install."""
import pytest
import torch
import torchvision

from utils.errors import UserError
from utils.vision import import_vision, matching_torchvision


@pytest.mark.parametrize("torch_version,wanted", [("2.4.0", "0.19"), ("2.11.0+cu130", "0.26"), ("2.14.1", "0.29")])
def test_the_matching_torchvision_release(torch_version, wanted):
    assert matching_torchvision(torch_version) == wanted


def test_the_installed_pair_matches():
    assert torchvision.__version__.startswith(matching_torchvision(torch.__version__) + ".")


def test_an_unmatched_pair_is_one_line(tmp_path, monkeypatch):
    """What ``import torchvision`` raises when its compiled operators do not fit torch."""
    (tmp_path / "unmatched_vision").mkdir()
    (tmp_path / "unmatched_vision" / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    wanted = r"torchvision does not match torch .*pip install 'torchvision==0\.\d+\.\*'"
    with pytest.raises(UserError, match=wanted) as e:
        import_vision("unmatched_vision")
    assert "\n" not in str(e.value)


def test_other_import_errors_are_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "broken_vision").mkdir()
    (tmp_path / "broken_vision" / "__init__.py").write_text('raise RuntimeError("something else")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="something else"):
        import_vision("broken_vision")
