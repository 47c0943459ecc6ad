"""Blended: the blend formula by hand, BackdoorBench's key pipeline, bad input, and a record end to end."""
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, expect_error, rebuild_and_defend, run_args
from PIL import Image

from attack.blended import Blended, main, noise_key
from utils.config import Config
from utils.datasets import DATASETS
from utils.errors import UserError
from utils.record import load_tensors, read_json

HELLO_KITTY = ROOT.parent / "shared" / "data" / "backdoorbench-resource" / "blended" / "hello_kitty.jpeg"
CIFAR = DATASETS["cifar10"]


def cfg(**kw):
    base = dict(attack_trigger_img_path=None, attack_train_blended_alpha=0.2, attack_test_blended_alpha=0.2)
    return Config(**{**base, **kw})




def test_blend_formula_by_hand():
    """x' = (1 - alpha) x + alpha t, clipped and truncated (not rounded) to uint8, as BackdoorBench."""
    art = Blended.make_trigger(cfg(), CIFAR)
    key = torch.zeros(3, 32, 32, dtype=torch.uint8)
    key[0, 0, 0], key[0, 0, 1], key[0, 0, 2], key[0, 0, 3], key[1, 5, 7] = 200, 0, 255, 7, 255
    art["trigger"] = key
    x = torch.full((2, 3, 32, 32), 50, dtype=torch.uint8)
    x[:, 0, 0, :4] = torch.tensor([100, 101, 255, 3], dtype=torch.uint8)
    x[1, 1, 5, 7] = 0
    out = Blended.apply_trigger(x, art)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    # 0.8*100 + 0.2*200 = 120; 0.8*101 = 80.8 -> 80; 0.8*255 + 0.2*255 = 255; 0.8*3 + 0.2*7 = 3.8 -> 3
    assert out[0, 0, 0, :4].tolist() == [120, 80, 255, 3]
    assert out[1, 1, 5, 7] == 51          # 0.2 * 255 = 51
    assert out[0, 1, 5, 7] == 91          # 0.8 * 50 + 51 = 91
    assert (out[:, 2] == 40).all()        # 0.8 * 50 + 0.2 * 0 = 40 everywhere the key is black
    # the training ratio is separate: alpha_train 0.5 -> 0.5*100 + 0.5*200 = 150; 0.5*101 = 50.5 -> 50
    art2 = Blended.make_trigger(cfg(attack_train_blended_alpha=0.5), CIFAR)
    art2["trigger"] = key
    train = Blended.apply_train_trigger(x, art2)
    assert train[0, 0, 0, :4].tolist() == [150, 50, 255, 5]  # 0.5*3 + 0.5*7 = 5
    assert torch.equal(Blended.apply_trigger(x, art2), out)  # test-time alpha stays 0.2


def test_default_key_is_fixed_noise_independent_of_seed():
    a = Blended.make_trigger(cfg(random_seed=0), CIFAR)
    b = Blended.make_trigger(cfg(random_seed=7), CIFAR)
    assert a["trigger"].shape == (3, 32, 32) and a["trigger"].dtype == torch.uint8
    assert torch.equal(a["trigger"], b["trigger"])
    assert torch.equal(a["trigger"], torch.from_numpy(np.random.RandomState(0).randint(0, 256, (3, 32, 32))).byte())
    assert a["trigger"].min() < 10 and a["trigger"].max() > 245 and len(a["trigger"].unique()) > 200
    assert torch.equal(a["trigger"], torch.from_numpy(noise_key(32)))


def test_custom_key_is_resized_bilinear(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "k.png")
    art = Blended.make_trigger(cfg(attack_trigger_img_path=str(tmp_path / "k.png")), CIFAR)
    expected = np.asarray(Image.fromarray(img).resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
    assert art["trigger"].shape == (3, 32, 32) and np.array_equal(art["trigger"].numpy(), expected)
    Image.fromarray(img[:32, :32, 0]).save(tmp_path / "grey.png")  # greyscale: same key on every channel
    grey = Blended.make_trigger(cfg(attack_trigger_img_path=str(tmp_path / "grey.png")), CIFAR)["trigger"]
    assert np.array_equal(grey.numpy(), np.stack([img[:32, :32, 0]] * 3))
    with pytest.raises(UserError, match="cannot read --attack_trigger_img_path"):
        Blended.make_trigger(cfg(attack_trigger_img_path=str(tmp_path / "missing.jpg")), CIFAR)
    with pytest.raises(UserError, match="--attack_test_blended_alpha 1.5 is outside"):
        Blended.make_trigger(cfg(attack_test_blended_alpha=1.5), CIFAR)


@pytest.mark.skipif(not HELLO_KITTY.exists(), reason=f"BackdoorBench's blended key not found at {HELLO_KITTY} "
                    "(/work/shared is absent on this machine)")
def test_hello_kitty_matches_backdoorbench():
    """The key loads at the data's size, and the blended images equal BackdoorBench's pipeline:
    ToPILImage -> Resize((32, 32)) -> ToTensor -> * 255, then (1 - a) * img + a * key, clip, astype(uint8)."""
    art = Blended.make_trigger(cfg(attack_trigger_img_path=str(HELLO_KITTY)), CIFAR)
    assert art["trigger"].shape == (3, 32, 32) and art["trigger"].dtype == torch.uint8
    transforms = pytest.importorskip("torchvision.transforms")
    raw = np.asarray(Image.open(HELLO_KITTY))
    bb_key = transforms.Compose([transforms.ToPILImage(), transforms.Resize((32, 32)), transforms.ToTensor()])(raw)
    bb_key = bb_key.numpy().transpose(1, 2, 0) * 255
    assert np.array_equal(art["trigger"].numpy().transpose(1, 2, 0), bb_key.astype(np.uint8))
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    for alpha in (0.2, 0.1, 0.35):
        expected = np.clip((1 - alpha) * images + alpha * bb_key, 0, 255).astype(np.uint8)
        a = Blended.make_trigger(cfg(attack_trigger_img_path=str(HELLO_KITTY), attack_test_blended_alpha=alpha),
                                 CIFAR)
        got = Blended.apply_trigger(torch.from_numpy(images).permute(0, 3, 1, 2), a).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(got, expected), alpha


def test_end_to_end_then_d3_and_rebuild(tiny_data, tmp_path):
    data = str(tiny_data["pickles"])
    main(["--save_folder_name", "x", *run_args(tiny_data, tmp_path), *TINY, "--epochs", "1"])
    rec = tmp_path / "x"
    assert (rec / "summary.json").is_file()
    meta = read_json(rec / "record.json")
    assert meta["attack"] == "blended" and meta["attack_label_trans"] == "all2one" and meta["attack_target"] == 0
    trig = load_tensors(rec / "trigger.safetensors")
    assert trig["trigger"].shape == (3, 32, 32) and float(trig["alpha_train"]) == 0.2
    idx = load_tensors(rec / "indices.safetensors")
    assert len(idx["train_poison_index"]) == 20 and len(idx["test_backdoor_index"]) == 90

    bd, dataset = rebuild_and_defend(rec, data, Blended)


def test_bad_input_writes_nothing(capsys, tiny_data, tmp_path):
    base = ["--save_folder_name", "bad", "--dataset_path", str(tiny_data["pickles"]), "--record_dir", str(tmp_path),
            "--model", "preactresnet18_w8", "--epochs", "1"]
    expect_error(capsys, main, [*base, "--attack_trigger_img_path", str(tmp_path / "none.png")],
                  "cannot read --attack_trigger_img_path")
    expect_error(capsys, main, [*base, "--attack_train_blended_alpha", "0"],
                  "--attack_train_blended_alpha 0.0 is outside")
    assert not (tmp_path / "bad").exists()
