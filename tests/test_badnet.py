
import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from attack.badnet import BadNet
from utils.config import Config
from utils.datasets import DATASETS
from utils.errors import UserError

BB_PATCH = ROOT.parent / "shared" / "data" / "backdoorbench-resource" / "badnet" / "trigger_image.png"


def test_default_trigger_is_a_3x3_white_corner():
    art = BadNet.make_trigger(Config(patch_size=3, patch_path=None, mask_path=None), DATASETS["cifar10"])
    assert art["patch"].shape == (3, 32, 32) and art["mask"].sum() == 27
    assert (art["patch"][:, 29:, 29:] == 255).all() and art["patch"].sum() == 27 * 255
    images = torch.randint(0, 200, (5, 3, 32, 32), dtype=torch.uint8)
    out = BadNet.apply_trigger(images, art)
    assert (out[:, :, 29:, 29:] == 255).all()
    assert torch.equal(out[:, :, :29], images[:, :, :29]) and torch.equal(out[:, :, :, :29], images[:, :, :, :29])


def test_custom_patch_and_mask(tmp_path):
    Image.fromarray(np.full((4, 4, 3), 128, dtype=np.uint8)).save(tmp_path / "p.png")
    mask = np.zeros((4, 4, 3), dtype=np.uint8)
    mask[0, 0] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    cfg = Config(patch_path=str(tmp_path / "p.png"), mask_path=str(tmp_path / "m.png"), patch_size=3)
    art = BadNet.make_trigger(cfg, DATASETS["cifar10"])
    assert art["mask"].sum() == 3 and art["mask"][:, 28, 28].all()  # small patches sit bottom-right
    out = BadNet.apply_trigger(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), art)
    assert out.sum() == 3 * 128
    with pytest.raises(UserError, match="cannot read patch"):
        BadNet.make_trigger(Config(patch_path=str(tmp_path / "missing.png"), mask_path=None), DATASETS["cifar10"])


@pytest.mark.skipif(not BB_PATCH.exists(), reason=f"BackdoorBench trigger not found at {BB_PATCH}")
def test_matches_backdoorbench_patch_trigger():
    """Same artifacts as BackdoorBench's resource/badnet/trigger_image.png, and the same image as its
    AddMaskPatchTrigger: img * (trigger == 0) + trigger * (trigger > 0)."""
    bb = np.asarray(Image.open(BB_PATCH).convert("RGB"), dtype=np.uint8)
    default = BadNet.make_trigger(Config(patch_size=3, patch_path=None, mask_path=None), DATASETS["cifar10"])
    from_file = BadNet.make_trigger(Config(patch_path=str(BB_PATCH), mask_path=None), DATASETS["cifar10"])
    for art in (default, from_file):
        assert np.array_equal(art["patch"].numpy().transpose(1, 2, 0), bb)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    expected = images * (bb == 0) + bb * (bb > 0)
    got = BadNet.apply_trigger(torch.from_numpy(images).permute(0, 3, 1, 2), default).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, expected)


def test_trigger_scales_to_the_image_size_as_backdoorbench_resizes_its_frame():
    """On 64-pixel images the default is BackdoorBench's 32x32 frame resized bilinearly (a solid 5x5 corner
    with soft edges), and so is a 32x32 --patch_path frame; a smaller patch is placed unscaled."""
    frame = np.zeros((32, 32, 3), dtype=np.uint8)
    frame[29:, 29:] = 255
    expected = np.asarray(Image.fromarray(frame).resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1)
    art = BadNet.make_trigger(Config(patch_size=3, patch_path=None, mask_path=None), DATASETS["tiny"])
    assert np.array_equal(art["patch"].numpy(), expected)
    assert (art["patch"][:, 59:, 59:] == 255).all() and art["patch"][:, :57].sum() == art["patch"][:, :, :57].sum() == 0
    assert torch.equal(art["mask"].bool(), art["patch"] > 0)
    if BB_PATCH.exists():
        from_file = BadNet.make_trigger(Config(patch_path=str(BB_PATCH), mask_path=None), DATASETS["tiny"])
        assert torch.equal(from_file["patch"], art["patch"])
    on_gtsrb = BadNet.make_trigger(Config(patch_size=3, patch_path=None, mask_path=None), DATASETS["gtsrb"])
    assert on_gtsrb["patch"].sum() == 27 * 255  # 32 pixels: unchanged
