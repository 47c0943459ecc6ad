"""SSBA (attack/ssba.py): the BCH-coded secret, the StegaStamp-style encoder/decoder, BackdoorBench's
.npy files, and records that rebuild their poisoned sets exactly."""
import types

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TINY, expect_error, rebuild_and_defend, run_args

from attack.record import load_attack_record, load_train_set, poisoned_train_set, rebuild_backdoor_test
from attack.ssba import SSBA, StegaDecoder, StegaEncoder, decode_secret, main, secret_bits, train_stegastamp
from utils.config import Config
from utils.datasets import DATASETS
from utils.errors import UserError
from utils.record import load_tensors, read_json
from utils.sources import load_dataset

CIFAR = DATASETS["cifar10"]
# The encoder's settings for tiny runs: one step of 32 tiny training images.
TINY_ENCODER = ["--ssba_encoder_epochs", "1", "--ssba_encoder_subset", "32", "--ssba_encoder_batch_size", "32",
                "--ssba_l2_loss_await", "0", "--ssba_l2_loss_ramp", "1"]


def cfg(**kw) -> Config:
    merged = {"device": "cpu", "amp": False, "cache_dir": None, "train_subset": None}
    for f in ("prototype/cifar10.yaml", "ssba/default.yaml"):
        merged.update(yaml.safe_load((ROOT / "config" / "attack" / f).read_text()))
    merged.update(kw)
    return Config(**merged)


# ----------------------------------------------------------------------------- the secret


def test_secret_is_bch_coded_and_corrects_five_bit_errors():
    bits = secret_bits("abcd")
    assert bits.shape == (100,) and bits.dtype == torch.uint8
    assert bits[:8].tolist() == [0, 1, 1, 0, 0, 0, 0, 1]            # 'a' = 0x61, most significant bit first
    assert bits[32:56].tolist() == [0, 0, 1, 0, 0, 0, 0, 0] * 3     # padded with spaces to 7 characters
    assert bits[96:].tolist() == [0, 0, 0, 0]                       # 96-bit packet padded to 100
    assert decode_secret(bits.tolist()) == "abcd"
    rng = np.random.default_rng(0)
    for errors in range(1, 6):  # BCH(137, 5): any 5 bit errors in the 96-bit packet (data + ecc) are corrected
        for _ in range(20):
            wrong = bits.clone()
            wrong[torch.from_numpy(rng.choice(96, errors, replace=False))] ^= 1
            assert decode_secret(wrong.tolist()) == "abcd"
    assert decode_secret(secret_bits("abcdefg").tolist()) == "abcdefg"
    with pytest.raises(UserError, match="at most 7"):
        secret_bits("abcdefgh")


# ----------------------------------------------------------------------------- the networks


def test_encoder_decoder_round_trip_beats_chance_on_a_toy_set():
    """A few training steps on toy 16x16 images: the decoder reads random secrets from the encoded,
    uint8-rounded held-out images above chance (a one-sided binomial bound, 4 standard deviations)."""
    rng = np.random.default_rng(0)
    labels = np.arange(240) % 10
    images = torch.from_numpy(np.clip((labels * 23 + 20)[:, None, None, None] + rng.integers(0, 40, (240, 3, 16, 16)),
                                      0, 255).astype(np.uint8))
    bits = 8
    encoder, decoder = train_stegastamp(images[:200], resolution=16, bits=bits, epochs=50, batch_size=16, lr=1e-3,
                                        l2_weight=10, bce_weight=1, l2_await=10 ** 6, l2_ramp=1, residual=False,
                                        seed=0, device="cpu", steps=30)
    held_out = images[200:].repeat(16, 1, 1, 1)
    secrets = torch.randint(0, 2, (len(held_out), bits), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # encoded and rounded to uint8 as the attack does, one secret per image
        encoded = (encoder.encode(secrets.float(), held_out.float() / 255) * 255).round().clamp(0, 255)
        read = (decoder(encoded / 255) > 0).long()
    trials = secrets.numel()
    accuracy = (read == secrets).float().mean().item()
    assert accuracy > 0.5 + 4 * (0.25 / trials) ** 0.5, accuracy


def test_encoder_shapes_and_output_modes():
    images = torch.rand(2, 3, 32, 32)
    fp = torch.randint(0, 2, (2, 100)).float()
    image_mode, residual_mode = StegaEncoder(32), StegaEncoder(32, residual=True)
    out = image_mode(fp, images)
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    assert residual_mode.encode(fp, images).shape == images.shape
    assert StegaDecoder(32)(images).shape == (2, 100)
    assert StegaDecoder(64)(torch.rand(1, 3, 64, 64)).shape == (1, 100)
    with pytest.raises(UserError, match="multiple of 16"):
        StegaEncoder(40)


def test_encoder_is_trained_once_then_cached(tiny_data, tmp_path, caplog):
    dataset = load_dataset("cifar10", str(tiny_data["pickles"]), None)
    c = cfg(cache_dir=str(tmp_path), ssba_encoder_epochs=1, ssba_encoder_subset=32, ssba_encoder_batch_size=32)
    # The toolkit's logger stops propagating once any run has set up logging (earlier tests in the
    # session), so caplog's handler is attached to it directly.
    from utils.logs import LOGGER_NAME, run_logger, setup_logging
    setup_logging()  # as a run leaves it, whatever ran before this test
    logger = run_logger()
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger=LOGGER_NAME):
            first = SSBA.trained_networks(c, CIFAR, dataset)[0].state_dict()
            second = SSBA.trained_networks(c, CIFAR, dataset)[0].state_dict()
    finally:
        logger.removeHandler(caplog.handler)
    assert "training the encoder/decoder on 32" in caplog.text and "from the cache" in caplog.text
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert len(list((tmp_path / "ssba").iterdir())) == 1
    SSBA.trained_networks(cfg(cache_dir=str(tmp_path), ssba_encoder_epochs=1, ssba_encoder_subset=32,
                              ssba_encoder_batch_size=32, ssba_secret="other", ssba_use_residual=True),
                          CIFAR, dataset)
    assert len(list((tmp_path / "ssba").iterdir())) == 2  # another setting, another entry


# ----------------------------------------------------------------------------- end to end


def test_end_to_end_encoder_then_d3_and_bit_exact_rebuild(tiny_data, tmp_path):
    data = str(tiny_data["pickles"])
    main(["--save_folder_name", "x", *run_args(tiny_data, tmp_path), *TINY, "--epochs", "1", *TINY_ENCODER,
          "--cache_dir", str(tmp_path / "cache")])
    rec = tmp_path / "x"
    meta = read_json(rec / "record.json")
    assert meta["attack"] == "ssba" and meta["attack_target"] == 0
    trig = load_tensors(rec / "trigger.safetensors")
    for k in ("psnr", "bit_accuracy", "bit_accuracy_unrounded", "secret_recovery"):  # the encoder's figures
        assert trig[k].dtype == torch.float64 and trig[k].dim() == 0
    assert 0 <= float(trig["bit_accuracy"]) <= 1 and float(trig["psnr"]) > 0
    assert torch.equal(trig["secret_bits"], secret_bits("abcd"))
    log = (rec / "attack.log").read_text()
    assert "PSNR" in log and "bit accuracy" in log

    bd, dataset = rebuild_and_defend(rec, data, SSBA)  # fingerprint-checked, then D3
    assert not torch.equal(bd.images, dataset.test.images[bd.index])  # the images did change
    record = load_attack_record(rec)
    poisoned = poisoned_train_set(record, load_train_set(record, dataset))  # fingerprint-checked too
    index = load_tensors(rec / "indices.safetensors")["train_poison_index"]
    assert (poisoned.labels[index] == 0).all()


def _npy_files(tiny_data, tmp_path, train_rows=200, test_rows=100, dtype=np.uint8):
    train = np.clip(tiny_data["x_train"].transpose(0, 2, 3, 1).astype(np.int64) + 9, 0, 255)[:train_rows]
    test = np.clip(tiny_data["x_test"].transpose(0, 2, 3, 1).astype(np.int64) + 9, 0, 255)[:test_rows]
    train[:, 0, 0, 0] = np.arange(len(train)) % 256  # every row its own, to catch a wrong lookup
    test[:, 0, 0, 0] = np.arange(len(test)) % 256
    np.save(tmp_path / "train.npy", train.astype(dtype))
    np.save(tmp_path / "test.npy", test.astype(dtype))
    return train.astype(np.uint8), test.astype(np.uint8)


def test_npy_images_are_carried_in_the_record_and_looked_up_by_index(tiny_data, tmp_path):
    train, test = _npy_files(tiny_data, tmp_path)
    main(["--save_folder_name", "bb", *run_args(tiny_data, tmp_path), *TINY, "--epochs", "1",
          "--attack_train_replace_imgs_path", str(tmp_path / "train.npy"),
          "--attack_test_replace_imgs_path", str(tmp_path / "test.npy")])
    rec = tmp_path / "bb"
    trig = load_tensors(rec / "trigger.safetensors")
    index = load_tensors(rec / "indices.safetensors")
    assert torch.equal(trig["train_index"], index["train_poison_index"])
    assert torch.equal(trig["test_index"], index["test_backdoor_index"])
    assert len(trig["train_images"]) == 20 and len(trig["test_images"]) == 90  # only the rows it needs
    assert "psnr" in trig
    meta = read_json(rec / "record.json")
    assert "train.npy" not in (rec / "config.yaml").read_text()  # machine-local paths stay out of the record

    dataset = load_dataset("cifar10", str(tiny_data["pickles"]), None)
    bd = rebuild_backdoor_test(meta, rec, dataset)
    assert np.array_equal(bd.images.numpy(), test[bd.index.numpy()].transpose(0, 3, 1, 2))
    record = load_attack_record(rec)
    poisoned = poisoned_train_set(record, dataset)
    p = index["train_poison_index"].numpy()
    assert np.array_equal(poisoned.images[p].numpy(), train[p].transpose(0, 3, 1, 2))
    others = np.setdiff1d(np.arange(200), p)
    assert torch.equal(poisoned.images[others], dataset.train.images[others])
    with pytest.raises(UserError, match="looked up by index"):
        SSBA.apply_trigger(dataset.test.images[:2], trig)


@pytest.mark.parametrize("rows, dtype, flags, pattern", [
    ((199, 100), np.uint8, [], "needs uint8 200x32x32x3"),
    ((200, 99), np.uint8, [], "needs uint8 100x32x32x3"),
    ((200, 100), np.float32, [], "holds float32"),
    ((200, 100), np.uint8, ["--train_subset", "100"], "--train_subset cannot be used"),
    ((200, 100), np.uint8, ["only-train"], "give both"),
])
def test_bad_npy_exits_2_and_writes_nothing(capsys, tiny_data, tmp_path, rows, dtype, flags, pattern):
    _npy_files(tiny_data, tmp_path, *rows, dtype=dtype)
    paths = ["--attack_train_replace_imgs_path", str(tmp_path / "train.npy")]
    if flags != ["only-train"]:
        paths += ["--attack_test_replace_imgs_path", str(tmp_path / "test.npy")]
    argv = ["--save_folder_name", "bad", *run_args(tiny_data, tmp_path / "rec"), *TINY, "--epochs", "1", *paths,
            *[f for f in flags if f != "only-train"]]
    expect_error(capsys, main, argv, pattern)
    assert not (tmp_path / "rec" / "bad").exists()


def test_bad_secret_exits_2_before_training(capsys, tiny_data, tmp_path):
    argv = ["--save_folder_name", "bad", *run_args(tiny_data, tmp_path / "rec"), *TINY, "--ssba_secret", "too-long",
            "--cache_dir", str(tmp_path / "cache")]
    expect_error(capsys, main, argv, "at most 7")
    assert not (tmp_path / "rec" / "bad").exists() and not (tmp_path / "cache" / "ssba").exists()


def test_image_loss_weight_follows_backdoorbench_gate():
    """BackdoorBench's schedule, step by step: the weight is 0 while the gate is closed (whatever the
    step count), opens after the first batch above 0.9, waits ``await`` steps, then ramps."""
    from attack.ssba import gate_step, l2_loss_weight
    accuracies = [0.5, 0.95, 0.6] + [0.5] * 6  # the gate opens after step 2, whatever comes later
    since, weights = torch.tensor(-1.0), []
    expected, bb_since = [], -1  # BackdoorBench's resource/ssba/train.py loop, as written there
    for acc in accuracies:
        weights.append(float(l2_loss_weight(since, 10, 2, 3)))
        since = gate_step(since, torch.tensor(acc))
        expected.append(min(max(0, 10 * (bb_since - 2) / 3), 10))
        if bb_since == -1:
            bb_since = 0 if acc > 0.9 else -1
        else:
            bb_since += 1
    assert weights == pytest.approx(expected) and weights == pytest.approx([0, 0, 0, 0, 0, 10 / 3, 20 / 3, 10, 10])


def test_image_loss_waits_for_the_bits(monkeypatch):
    """Through the real loop: while no batch passes the gate, the image loss's weight has no effect
    (the same networks with weight 10 or 0); once the gate opens at once it has."""
    import attack.ssba as ssba
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(resolution=16, bits=8, epochs=2, batch_size=8, lr=1e-3, bce_weight=1, l2_await=0, l2_ramp=1,
                  residual=False, seed=5, device="cpu")
    warnings = []
    log = types.SimpleNamespace(info=lambda *a: None, warning=lambda msg, *a: warnings.append(msg % a))

    def encoder_weights(l2_weight):
        return train_stegastamp(images, l2_weight=l2_weight, log=log, **kwargs)[0].state_dict()

    monkeypatch.setattr(ssba, "L2_GATE_BIT_ACCURACY", 1.01)  # no batch can pass it
    closed = encoder_weights(10), encoder_weights(0)
    assert all(torch.equal(closed[0][k], closed[1][k]) for k in closed[0])
    assert len(warnings) == 2 and all("image loss never acted" in w for w in warnings)
    monkeypatch.setattr(ssba, "L2_GATE_BIT_ACCURACY", -1.0)  # the first batch opens it
    opened = encoder_weights(10)
    assert not all(torch.equal(opened[k], closed[0][k]) for k in opened) and len(warnings) == 2
