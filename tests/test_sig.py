"""SIG: the sinusoid by hand, the clean-label target-class draw and its pratio limit, and a record end to end."""
import numpy as np
import pytest
import torch
from conftest import TINY, expect_error, rebuild_and_defend, run_args

from attack.sig import SIG, main
from utils.config import Config
from utils.datasets import DATASETS, tensor_fingerprint
from utils.errors import UserError
from utils.record import load_tensors, read_json

CIFAR = DATASETS["cifar10"]
DEFAULT = Config(sig_delta=40.0, sig_f=6.0, attack_label_trans="all2one", attack_target=0, pratio=0.1, random_seed=0)


def cfg(**kw):
    return Config(**{**vars(DEFAULT), **kw})




def triggered_row(value: int) -> list[int]:
    art = SIG.make_trigger(DEFAULT, CIFAR)
    out = SIG.apply_trigger(torch.full((2, 3, 32, 32), value, dtype=torch.uint8), art)
    assert out.dtype == torch.uint8
    assert (out == out[0, 0, 0]).all(), "the signal must be the same on every image, channel and row"
    return out[0, 0, 0].tolist()


def test_signal_on_a_row_by_hand():
    """40 sin(2 pi j 6 / 32) takes the values 0, +-15.31, +-28.28, +-36.96, +-40 along the 32 columns;
    added to 100 and truncated: 100 + 36.96 -> 136, 100 - 15.31 -> 84, 100 - 36.96 -> 63."""
    assert triggered_row(100) == [100, 136, 128, 84, 60, 84, 128, 136,
                                  100, 63, 71, 115, 140, 115, 71, 63,
                                  # j = 16: sin(6 pi) is -2.9e-14 in float64 and BackdoorBench truncates: 99
                                  99, 136, 128, 84, 60, 84, 128, 136,
                                  100, 63, 71, 115, 140, 115, 71, 63]
    # clipping at 255: 230 + 36.96, 230 + 28.28, 230 + 40 -> 255; 230 + 15.31 -> 245 (j = 11, 13)
    row = triggered_row(230)
    assert row[:8] == [230, 255, 255, 214, 190, 214, 255, 255] and row[11:14] == [245, 255, 245]
    # clipping at 0: 20 - 40, 20 - 36.96, 20 - 28.28 -> 0; 20 - 15.31 -> 4
    row = triggered_row(20)
    assert row[:8] == [20, 56, 48, 4, 0, 4, 48, 56] and row[8:11] == [20, 0, 0]


def test_signal_depends_on_the_column_only_and_matches_backdoorbench():
    art = SIG.make_trigger(DEFAULT, CIFAR)
    assert art["signal"].shape == (32,) and art["signal"].dtype == torch.float32
    assert art["signal"][4] == -40 and art["signal"][12] == 40
    x = torch.randint(50, 201, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    diff = SIG.apply_trigger(x, art).int() - x.int()
    assert torch.equal(diff, diff[0, 0, 0].expand_as(diff))  # same shift on every image, channel and row
    # BackdoorBench's sigTrigger on HWC images: uint32(img) + float32 pattern of the column, clip, astype(uint8)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    for delta, f in ((40, 6), (20, 3), (33.5, 2.5)):
        pattern = (delta * np.sin(2 * np.pi * np.arange(32) * f / 32)).astype(np.float32)[None, None, :, None]
        expected = np.clip(images.astype(np.uint32) + pattern, 0, 255).astype(np.uint8)
        a = SIG.make_trigger(cfg(sig_delta=float(delta), sig_f=float(f)), CIFAR)
        got = SIG.apply_trigger(torch.from_numpy(images).permute(0, 3, 1, 2), a).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(got, expected), (delta, f)


def test_poison_index_is_target_class_only_with_pratio_of_the_whole_set():
    labels = torch.arange(1000) % 10
    idx = SIG.select_poison_index(cfg(attack_target=3), labels)
    assert idx.tolist() == list(range(3, 1000, 10))  # 0.1 * 1000 = 100 = the whole class 3
    half = SIG.select_poison_index(cfg(attack_target=3, pratio=0.05), labels)
    assert len(half) == 50 and (labels[half] == 3).all() and torch.equal(half, half.sort().values)
    assert torch.equal(half, SIG.select_poison_index(cfg(attack_target=3, pratio=0.05), labels))
    assert not torch.equal(half, SIG.select_poison_index(cfg(attack_target=3, pratio=0.05, random_seed=1), labels))
    with pytest.raises(UserError, match=r"the largest possible --pratio is 0\.1$"):
        SIG.select_poison_index(cfg(pratio=0.11), labels)
    with pytest.raises(UserError, match="only --attack_label_trans all2one"):
        SIG.select_poison_index(cfg(attack_label_trans="all2all"), labels)
    with pytest.raises(UserError, match="--sig_delta -1.0 must be positive"):
        SIG.make_trigger(cfg(sig_delta=-1.0), CIFAR)


def test_end_to_end_clean_label_then_d3_and_rebuild(tiny_data, tmp_path):
    data = str(tiny_data["pickles"])
    main(["--save_folder_name", "x", *run_args(tiny_data, tmp_path), *TINY, "--epochs", "1"])
    rec = tmp_path / "x"
    assert (rec / "summary.json").is_file()
    meta = read_json(rec / "record.json")
    assert meta["attack"] == "sig" and meta["attack_target"] == 0
    idx = load_tensors(rec / "indices.safetensors")
    trig = load_tensors(rec / "trigger.safetensors")
    train_x, train_y = torch.from_numpy(tiny_data["x_train"]), torch.from_numpy(tiny_data["y_train"])
    poison = idx["train_poison_index"]
    # pratio 0.1 of 200 = 20 = every class-0 training image of the tiny set, and no other
    assert poison.tolist() == torch.nonzero(train_y == 0).flatten().tolist() and len(poison) == 20
    # the training set the victim saw: the signal on those images and NO label changed
    images = train_x.clone()
    images[poison] = SIG.apply_trigger(train_x[poison], trig)
    assert meta["poisoned_train_fingerprint"] == tensor_fingerprint(images, train_y)
    assert meta["poisoned_train_fingerprint"] != tensor_fingerprint(images, torch.zeros_like(train_y))

    bd, dataset = rebuild_and_defend(rec, data, SIG)
    assert len(bd) == 90  # the non-target test images


def test_bad_input_writes_nothing(capsys, tiny_data, tmp_path):
    base = ["--save_folder_name", "bad", "--dataset_path", str(tiny_data["pickles"]), "--record_dir", str(tmp_path),
            "--model", "preactresnet18_w8", "--epochs", "1"]
    expect_error(capsys, main, [*base, "--pratio", "0.2"], "the largest possible --pratio is 0.1")
    expect_error(capsys, main, [*base, "--attack_label_trans", "all2all"],
                  "supports only --attack_label_trans all2one")
    expect_error(capsys, main, [*base, "--sig_f", "0"], "--sig_f 0.0 must be positive")
    assert not (tmp_path / "bad").exists()


def test_help_states_the_meaning_of_pratio(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--pratio: fraction of the WHOLE training set, drawn from the target class only" in " ".join(out.split())
    assert "--sig_delta" in out and "--sig_f" in out
