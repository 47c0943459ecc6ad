"""Low Frequency (attack/lf.py): BackdoorBench's additive trigger, its .npy files, and the generator."""
import json
import pathlib
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TINY, expect_error, rebuild_and_defend, run_args

import attack.lf as lf
from attack.lf import LowFrequency, band_mask, low_pass, main
from models import create_model
from utils.config import Config
from utils.datasets import DATASETS
from utils.errors import UserError
from utils.loader import Normalizer
from utils.record import load_tensors, read_json, save_tensors
from utils.sources import load_dataset

BB_DIR = ROOT.parent / "shared" / "data" / "backdoorbench-resource" / "lowFrequency"
BB_FILE = BB_DIR / "cifar10_preactresnet18_0_255.npy"
CIFAR = DATASETS["cifar10"]


def cfg(**kw) -> Config:
    """The script's resolved defaults (prototype + lf/default.yaml), with overrides."""
    merged = {"device": "cpu", "amp": False, "cache_dir": None, "random_crop_padding": 4, "random_hflip": True,
              "steplr_milestones": [], "steplr_stepsize": 30, "steplr_gamma": 0.1}
    for f in ("prototype/cifar10.yaml", "lf/default.yaml"):
        merged.update(yaml.safe_load((ROOT / "config" / "attack" / f).read_text()))
    merged.update(device="cpu", **kw)
    return Config(**merged)


def blob(size=32) -> np.ndarray:
    """A hand-made smooth H x W x 3 uint8 pattern, 0..51."""
    yy, xx = np.mgrid[:size, :size]
    g = np.exp(-((yy - 15.5) ** 2 + (xx - 12.0) ** 2) / (2 * 8.0 ** 2))
    return np.round(np.stack([g * 51, g * 20, g[::-1] * 40], axis=-1)).astype(np.uint8)


def out_of_band_fraction(pattern_chw: torch.Tensor, cutoff: float) -> float:
    energy = torch.fft.fft2(pattern_chw.double()).abs() ** 2
    mask = band_mask(*pattern_chw.shape[-2:], cutoff)
    return float(energy[:, ~mask].sum() / energy.sum())




# ----------------------------------------------------------------------------- the trigger


def test_pattern_is_added_clipped_and_truncated_by_hand():
    """BackdoorBench's SimpleAdditiveTrigger: uint8(clip(float64(x) + float64(p), 0, 255))."""
    pattern = torch.zeros(3, 32, 32, dtype=torch.float64)
    images = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    pattern[0, 0, :5] = torch.tensor([3, 10, 0, 51, 4], dtype=torch.float64)
    images[0, 0, 0, :5] = torch.tensor([250, 250, 255, 254, 251], dtype=torch.uint8)
    pattern[1, 3, 4], pattern[2, 7, 7], pattern[2, 8, 8] = 2.7, -7.5, -0.5
    images[:, 1, 3, 4], images[:, 2, 7, 7], images[:, 2, 8, 8] = 100, 5, 100
    out = LowFrequency.apply_trigger(images, {"pattern": pattern})
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert out[0, 0, 0, :5].tolist() == [253, 255, 255, 255, 255]  # 250+3, 260 -> 255, 255+0, 305 -> 255, 255
    assert out[1, 0, 0, :5].tolist() == [203, 210, 200, 251, 204]
    assert out[0, 1, 3, 4] == 102    # 102.7 truncated
    assert out[0, 2, 7, 7] == 0      # -2.5 clipped to 0
    assert out[0, 2, 8, 8] == 99     # 99.5 truncated
    assert (out[:, :, 20:] == 200).all()  # zero pattern: unchanged
    ref = np.clip(images.numpy().astype(np.float64) + pattern.numpy(), 0, 255).astype(np.uint8)
    assert np.array_equal(out.numpy(), ref)


def test_three_npy_shapes_give_the_same_artifact(tmp_path):
    grey = blob()[..., 0]
    np.save(tmp_path / "hw.npy", grey)
    np.save(tmp_path / "hwc.npy", np.stack([grey] * 3, axis=-1))
    np.save(tmp_path / "1hwc.npy", np.stack([grey] * 3, axis=-1)[None])
    arts = [LowFrequency.make_trigger(cfg(lowFrequencyPatternPath=str(tmp_path / f)), CIFAR)["pattern"]
            for f in ("hw.npy", "hwc.npy", "1hwc.npy")]
    assert arts[0].shape == (3, 32, 32) and arts[0].dtype == torch.float64
    assert torch.equal(arts[0], arts[1]) and torch.equal(arts[0], arts[2])
    assert np.array_equal(arts[0][1].numpy(), grey)
    colour = blob()  # H x W x C keeps its channels, transposed to C x H x W
    np.save(tmp_path / "c.npy", colour)
    art = LowFrequency.make_trigger(cfg(lowFrequencyPatternPath=str(tmp_path / "c.npy")), CIFAR)["pattern"]
    assert np.array_equal(art.numpy(), colour.transpose(2, 0, 1))


def test_folder_resolves_to_backdoorbench_name(tmp_path):
    np.save(tmp_path / "cifar10_preactresnet18_w8_0_255.npy", blob())
    art = LowFrequency.make_trigger(cfg(model="preactresnet18_w8", lowFrequencyPatternPath=str(tmp_path)), CIFAR)
    assert np.array_equal(art["pattern"].numpy(), blob().transpose(2, 0, 1))
    with pytest.raises(UserError, match="looked for .*cifar10_preactresnet18_0_255.npy"):
        LowFrequency.make_trigger(cfg(model="preactresnet18", lowFrequencyPatternPath=str(tmp_path)), CIFAR)


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_pickled_npy_is_refused_without_running_it(tmp_path, capsys, tiny_data):
    marker = tmp_path / "ran"
    np.save(tmp_path / "evil.npy", np.array([_Evil(str(marker))], dtype=object), allow_pickle=True)
    assert not marker.exists()
    with pytest.raises(UserError, match="refused trigger file .*pickled Python objects"):
        LowFrequency.make_trigger(cfg(lowFrequencyPatternPath=str(tmp_path / "evil.npy")), CIFAR)
    expect_error(capsys, main, ["--save_folder_name", "bad", "--dataset_path", str(tiny_data["pickles"]),
                                 "--record_dir", str(tmp_path),
                                 "--lowFrequencyPatternPath", str(tmp_path / "evil.npy")],
                  "pickled Python objects")
    assert not marker.exists() and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name,content,pattern", [
    ("chw.npy", np.zeros((3, 32, 32), np.uint8) + 5, "has shape 3x32x32"),
    ("small.npy", np.zeros((16, 16, 3), np.uint8) + 5, "has shape 16x16x3"),
    ("five.npy", np.zeros((1, 1, 32, 32, 3), np.uint8) + 5, "has shape 1x1x32x32x3"),
    ("empty.npy", np.zeros((0, 32, 32, 3), np.uint8), "has shape 0x32x32x3"),
    ("nan.npy", np.full((32, 32, 3), np.nan, np.float32), "NaN or infinite"),
    ("zero.npy", np.zeros((1, 32, 32, 3), np.float32), "changes no pixel"),
    ("text.npy", np.full((32, 32, 3), "a"), "must be numbers"),
    ("garbage.npy", b"this is not numpy", "is not a .npy file"),
    ("truncated.npy", "truncated", "the file is damaged"),
    ("missing.npy", None, "does not exist"),
])
def test_bad_npy_exits_2_and_writes_nothing(capsys, tiny_data, tmp_path, name, content, pattern):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        np.save(path, blob())
        path.write_bytes(path.read_bytes()[:200])
    argv = ["--save_folder_name", "bad", "--dataset_path", str(tiny_data["pickles"]), "--record_dir",
            str(tmp_path / "rec"), "--model", "preactresnet18_w8", "--epochs", "1",
            "--lowFrequencyPatternPath", str(path)]
    expect_error(capsys, main, argv, pattern)
    assert not (tmp_path / "rec" / "bad").exists()


def test_bad_generator_flags_exit_2(capsys, tiny_data, tmp_path):
    base = ["--save_folder_name", "bad", "--dataset_path", str(tiny_data["pickles"]), "--record_dir", str(tmp_path),
            "--model", "preactresnet18_w8", "--epochs", "1", "--cache_dir", str(tmp_path / "cache")]
    expect_error(capsys, main, [*base, "--lf_cutoff", "0"], "--lf_cutoff 0.0 is outside (0, 1]")
    expect_error(capsys, main, [*base, "--lf_uap_passes", "0"], "--lf_uap_passes 0 must be at least 1")
    expect_error(capsys, main, [*base, "--lf_clean_model_path", str(tmp_path / "none.safetensors")],
                  "--lf_clean_model_path")
    expect_error(capsys, main, [*base, "--lowFrequencyPatternPath", str(tmp_path)], "looked for")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "cache" / "lowFrequency").exists()


# ----------------------------------------------------------------------------- the generator


def test_low_pass_filter_keeps_only_the_band():
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert out_of_band_fraction(x, 0.125) > 0.9  # white noise lives mostly outside
    y = low_pass(x, 0.125)
    assert out_of_band_fraction(y, 0.125) < 1e-12
    assert torch.allclose(low_pass(y, 0.125), y, atol=1e-5)  # a projection
    assert int(band_mask(32, 32, 0.125).sum()) == 13  # radius 2 cycles per image: 13 frequencies
    assert int(band_mask(64, 64, 0.125).sum()) == 49  # radius 4 on 64 x 64


class _LeftRight(torch.nn.Module):
    """A stand-in classifier: class 1 when the red channel's left half is brighter than its right half
    by more than 20 levels (a low-frequency feature the UAP has to find), else class 0."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        s = x[:, 0, :, :16].mean((1, 2)) - x[:, 0, :, 16:].mean((1, 2))
        return torch.stack([torch.zeros_like(s), (s - 20) / 5], 1) + self.dummy


def test_uap_finds_the_targeted_low_frequency_direction():
    images = torch.randint(60, 190, (96, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    labels = torch.zeros(96, dtype=torch.long)
    identity = Normalizer((0, 0, 0), (1 / 255,) * 3, "cpu")  # the model sees 0..255 values
    model = _LeftRight()
    assert (model(identity(images)).argmax(1) == 1).sum() == 0
    arr, rate = lf.universal_low_frequency_pattern(model, images, labels, identity, target=1, rule="all2one",
                                                   passes=5, step=4.0, batch_size=32, cutoff=0.125, seed=0)
    assert rate == 1.0 and arr.dtype == np.uint8 and (arr.min(), arr.max()) == (0, 51)
    red = arr[..., 0].astype(float)
    assert red[:, :16].mean() - red[:, 16:].mean() > 20  # left bright, right dark
    pattern = torch.from_numpy(arr.transpose(2, 0, 1)).double()
    assert out_of_band_fraction(pattern, 0.125) < 1e-3
    again, _ = lf.universal_low_frequency_pattern(model, images, labels, identity, target=1, rule="all2one",
                                                  passes=5, step=4.0, batch_size=32, cutoff=0.125, seed=0)
    assert np.array_equal(arr, again)  # seeded: the same pattern


def _dataset(tiny_data):
    return load_dataset("cifar10", tiny_data["pickles"], None)


def test_generator_is_low_frequency_in_range_and_cached(tiny_data, tmp_path, monkeypatch, capsys):
    dataset = _dataset(tiny_data)
    c = cfg(model="preactresnet18_w8", epochs=1, batch_size=100, lf_uap_passes=2, lf_uap_samples=64,
            cache_dir=str(tmp_path))
    art = LowFrequency.make_trigger(c, CIFAR, dataset)["pattern"]
    assert art.shape == (3, 32, 32) and art.dtype == torch.float64
    assert torch.equal(art, art.round())  # integers, like BackdoorBench's uint8 files
    assert (float(art.min()), float(art.max())) == (0.0, 51.0)  # the published files' range
    assert out_of_band_fraction(art, c.lf_cutoff) < 1e-3  # only rounding to integers leaves the band
    assert out_of_band_fraction(art, c.lf_cutoff) < out_of_band_fraction(art, 1.0) + 1e-3
    folders = list((tmp_path / "lowFrequency").glob("cifar10_preactresnet18_w8-*"))
    assert len(folders) == 1
    npy = folders[0] / "cifar10_preactresnet18_w8_0_255.npy"
    arr = np.load(npy, allow_pickle=False)
    assert f"low-frequency trigger written to {npy}" in capsys.readouterr().err
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8 and np.array_equal(arr.transpose(2, 0, 1), art.numpy())
    settings = json.loads((folders[0] / "settings.json").read_text())
    assert settings["lf_uap_passes"] == 2 and settings["clean_model"]["epochs"] == 1
    assert len(list((tmp_path / "lowFrequency" / "clean_models").glob("*.safetensors"))) == 1

    def boom(*a, **k):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(lf, "fit", boom)
    monkeypatch.setattr(lf, "universal_low_frequency_pattern", boom)
    start = time.perf_counter()
    again = LowFrequency.make_trigger(c, CIFAR, dataset)["pattern"]
    assert time.perf_counter() - start < 2.0 and torch.equal(again, art)
    # the folder can be given back to the flag
    from_folder = cfg(model="preactresnet18_w8", lowFrequencyPatternPath=str(folders[0]))
    assert torch.equal(LowFrequency.make_trigger(from_folder, CIFAR)["pattern"], art)

    # another UAP setting: another file, but the same cached clean model (no training)
    monkeypatch.undo()
    monkeypatch.setattr(lf, "fit", boom)
    other = LowFrequency.make_trigger(cfg(model="preactresnet18_w8", epochs=1, batch_size=100, lf_uap_passes=1,
                                          lf_uap_samples=64, lf_uap_step=8.0, cache_dir=str(tmp_path)), CIFAR, dataset)
    assert len(list((tmp_path / "lowFrequency").glob("cifar10_preactresnet18_w8-*"))) == 2
    assert (float(other["pattern"].min()), float(other["pattern"].max())) == (0.0, 51.0)


def test_generator_takes_clean_weights(tiny_data, tmp_path, monkeypatch):
    dataset = _dataset(tiny_data)
    torch.manual_seed(0)
    save_tensors(tmp_path / "clean.safetensors", create_model("preactresnet18_w8", 10).state_dict())
    torch.save(create_model("preactresnet18_w16", 10).state_dict(), tmp_path / "w16.pt")

    def boom(*a, **k):
        raise AssertionError("no clean model should be trained")
    monkeypatch.setattr(lf, "fit", boom)
    c = cfg(model="preactresnet18_w8", batch_size=32, lf_uap_passes=1, lf_uap_samples=32, cache_dir=str(tmp_path),
            lf_clean_model_path=str(tmp_path / "clean.safetensors"), attack_label_trans="all2all")
    art = LowFrequency.make_trigger(c, CIFAR, dataset)["pattern"]
    assert (float(art.min()), float(art.max())) == (0.0, 51.0)
    settings = json.loads(next((tmp_path / "lowFrequency").glob("*/settings.json")).read_text())
    assert "weights_sha256" in settings["clean_model"] and settings["uap_images"] == 32
    with pytest.raises(UserError, match="do not fit"):
        LowFrequency.make_trigger(cfg(model="preactresnet18_w8", lf_clean_model_path=str(tmp_path / "w16.pt"),
                                      cache_dir=str(tmp_path)), CIFAR, dataset)


# ----------------------------------------------------------------------------- BackdoorBench's file


@pytest.mark.skipif(not BB_FILE.exists(), reason=f"BackdoorBench's trigger not found at {BB_FILE} "
                    "(/work/shared is absent on this machine)")
def test_published_file_loads_and_adds_as_backdoorbench():
    raw = np.load(BB_FILE, allow_pickle=False)
    by_file = LowFrequency.make_trigger(cfg(lowFrequencyPatternPath=str(BB_FILE)), CIFAR)["pattern"]
    by_folder = LowFrequency.make_trigger(cfg(lowFrequencyPatternPath=str(BB_DIR)), CIFAR)["pattern"]
    assert torch.equal(by_file, by_folder) and np.array_equal(by_file.numpy(), raw.transpose(2, 0, 1))
    assert (float(by_file.min()), float(by_file.max())) == (0.0, lf.PATTERN_RANGE)  # the generator's range
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    images[0] = 250  # near 255: clipping
    expected = np.clip(images.astype(np.float64) + raw.astype(np.float64), 0, 255).astype(np.uint8)
    got = LowFrequency.apply_trigger(torch.from_numpy(images).permute(0, 3, 1, 2), {"pattern": by_file})
    assert np.array_equal(got.permute(0, 2, 3, 1).numpy(), expected)
    assert (expected[0] == np.minimum(250 + raw.astype(int), 255)).all()


def test_unit_scale_files_are_scaled_with_a_warning():
    """BackdoorBench's VGG19-BN and ViT-B/16 files are float 0..0.2 (the [0, 1] scale): read as 0..51."""
    import logging
    vgg = BB_DIR / "cifar10_vgg19_bn_0_255.npy"
    if not vgg.is_file():
        pytest.skip(f"BackdoorBench's resource files are not at {BB_DIR}")
    raw = np.load(vgg, allow_pickle=False)
    assert raw.dtype == np.float32 and float(raw.max()) == pytest.approx(0.2)
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    lf.run_logger().addHandler(handler)
    try:
        arr = lf.read_pattern_file(vgg, 32)
    finally:
        lf.run_logger().removeHandler(handler)
    assert np.allclose(arr, raw[0].astype(np.float64) * 255) and any("scaled to 0..255" in m for m in seen)


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_then_d3_and_rebuild(tiny_data, tmp_path):
    np.save(tmp_path / "blob.npy", blob())
    data = str(tiny_data["pickles"])
    main(["--save_folder_name", "x", *run_args(tiny_data, tmp_path), *TINY, "--epochs", "1",
          "--lowFrequencyPatternPath", str(tmp_path / "blob.npy")])
    rec = tmp_path / "x"
    assert (rec / "summary.json").is_file()
    meta = read_json(rec / "record.json")
    assert meta["attack"] == "lf" and meta["attack_label_trans"] == "all2one" and meta["attack_target"] == 0
    trig = load_tensors(rec / "trigger.safetensors")
    assert np.array_equal(trig["pattern"].numpy(), blob().transpose(2, 0, 1))
    idx = load_tensors(rec / "indices.safetensors")
    assert len(idx["train_poison_index"]) == 20 and len(idx["test_backdoor_index"]) == 90

    bd, dataset = rebuild_and_defend(rec, data, LowFrequency)
    by_hand = np.clip(dataset.test.images[bd.index].numpy().astype(np.float64) + blob().transpose(2, 0, 1), 0, 255)
    assert np.array_equal(bd.images.numpy(), by_hand.astype(np.uint8))
