"""WaNet: the warp against grid_sample worked out by hand, the field against its formula, the per-batch
poisoning counts and labels, WaNet's batch augmentation against torchvision, reproducibility, and an
end-to-end run whose record rebuilds the backdoor test set."""
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TINY, expect_error, rebuild_and_defend, run_args

from attack.wanet import (
    WaNet,
    apply_augment,
    augment_batch,
    batch_counts,
    crop,
    draw_augment_params,
    identity_grid,
    main,
    noise_grids,
    poison_batch,
    warp,
    warp_grid,
)
from utils.config import Config
from utils.datasets import DATASETS, ImageSet
from utils.loader import BatchLoader, Normalizer
from utils.record import load_tensors, read_json
from utils.train import build_scheduler

CIFAR = DATASETS["cifar10"]
FILL = torch.tensor(CIFAR.mean) * 255.0


def cfg(**kw):
    base = dict(k=4, s=0.5, grid_rescale=1.0, cross_ratio=2.0, random_crop=5, random_rotation=10.0, pratio=0.1,
                attack_target=0, attack_label_trans="all2one", random_seed=0)
    base.update(kw)
    return Config(**base)


def images(n=8, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))




# ----------------------------------------------------------------------------- the warp

def test_identity_field_leaves_images_unchanged():
    x = images()
    assert torch.equal(warp(x, identity_grid(32)), x)
    assert torch.equal(identity_grid(32)[0, 3, 7], torch.tensor([-1 + 2 * 7 / 31, -1 + 2 * 3 / 31]))  # (x, y)


def test_one_pixel_shifts_match_roll():
    """With align_corners=True one pixel is 2 / (W - 1) grid units: a shifted grid reads the neighbour."""
    x = images()
    right = identity_grid(32).clone()
    right[..., 0] += 2 / 31  # every output pixel reads the one to its right
    out = warp(x, right)
    assert torch.equal(out[..., :-1], torch.roll(x, -1, dims=3)[..., :-1])
    assert (out[..., -1] == 0).all()  # read from outside the image: zero padding
    down = identity_grid(32).clone()
    down[..., 1] -= 2 / 31  # every output pixel reads the one above it
    out = warp(x, down)
    assert torch.equal(out[:, :, 1:], torch.roll(x, 1, dims=2)[:, :, 1:])


def _bilinear_by_hand(img: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """grid_sample(bilinear, zeros, align_corners=True) in float64: img [C,H,W], grid [H,W,2]."""
    c, h, w = img.shape
    px, py = (grid[..., 0] + 1) / 2 * (w - 1), (grid[..., 1] + 1) / 2 * (h - 1)
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    out = np.zeros((c,) + px.shape)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1 - np.abs(px - xi)) * (1 - np.abs(py - yi))
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            out += np.where(inside, weight, 0) * img[:, yi.clip(0, h - 1), xi.clip(0, w - 1)]
    return out


def test_trigger_is_bilinear_sampling_rounded():
    art = WaNet.make_trigger(cfg(), CIFAR)
    x = images(4)
    got = WaNet.apply_trigger(x, art)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    for i in range(4):
        expected = _bilinear_by_hand(x[i].double().numpy(), art["grid"][0].double().numpy())
        tie = np.abs(expected - np.floor(expected) - 0.5) < 1e-3  # float32 may round either way there
        exact = np.rint(expected)
        assert np.array_equal(got[i].numpy()[~tie], exact[~tie])
        assert np.abs(got[i].numpy()[tie] - expected[tie]).max(initial=0) <= 0.51
    assert (got != x).float().mean() > 0.5  # the warp moves most pixels (the field is a real warp)


# ----------------------------------------------------------------------------- the field

def _bicubic_matrix(k: int, size: int, a: float = -0.75) -> np.ndarray:
    """[size, k] weights of PyTorch's bicubic upsampling with align_corners=True (Keys kernel, a = -0.75,
    edge taps clamped)."""
    def kernel(t):
        t = abs(t)
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t <= 1 else a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    m = np.zeros((size, k))
    for i in range(size):
        src = i * (k - 1) / (size - 1)
        i0 = math.floor(src)
        t = src - i0
        for tap, dist in zip(range(i0 - 1, i0 + 3), (1 + t, t, 1 - t, 2 - t)):
            m[i, min(max(tap, 0), k - 1)] += kernel(dist)
    return m


@pytest.mark.parametrize("k,s,rescale", [(4, 0.5, 1.0), (8, 1.0, 1.0), (4, 0.5, 1.05)])
def test_field_follows_the_formula(k, s, rescale):
    art = WaNet.make_trigger(cfg(k=k, s=s, grid_rescale=rescale), CIFAR)
    noise, grid = art["noise"].double(), art["grid"].double()
    assert noise.shape == (1, 2, k, k) and grid.shape == (1, 32, 32, 2)
    assert noise.abs().mean().item() == pytest.approx(1.0, abs=1e-6)  # normalised by its mean |value|
    assert float(art["s"]) == s and int(art["k"]) == k and float(art["grid_rescale"]) == rescale
    m = _bicubic_matrix(k, 32)
    field = np.stack([m @ noise[0, c].numpy() @ m.T for c in range(2)], axis=-1)  # [H, W, 2]: (x, y)
    lin = np.linspace(-1, 1, 32)
    identity = np.stack(np.meshgrid(lin, lin, indexing="xy"), axis=-1)  # [..., 0] = column, [..., 1] = row
    expected = np.clip((identity + s * field / 32) * rescale, -1, 1)
    np.testing.assert_allclose(grid[0].numpy(), expected, atol=1e-5)
    assert grid.abs().max() <= 1
    if rescale > 1:
        assert (grid.abs() == 1).sum() > 10  # the border is clamped


def test_field_is_seeded():
    a, b = WaNet.make_trigger(cfg(), CIFAR), WaNet.make_trigger(cfg(), CIFAR)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["noise"], WaNet.make_trigger(cfg(random_seed=1), CIFAR)["noise"])
    assert torch.equal(WaNet.select_poison_index(cfg(), torch.zeros(50, dtype=torch.long)), torch.empty(0).long())


# ----------------------------------------------------------------------------- per-batch poisoning

@pytest.mark.parametrize("rule", ["all2one", "all2all"])
def test_batch_holds_backdoor_noise_and_clean_samples(rule):
    art = WaNet.make_trigger(cfg(), CIFAR)
    x, y = images(64), torch.arange(64) % 10
    out, labels = poison_batch(x, y, art["grid"], pratio=0.1, cross_ratio=2.0, rule=rule, target=3, num_classes=10,
                               generator=torch.Generator().manual_seed(5))
    assert out.dtype == torch.uint8
    num_bd, num_cross = 6, 12  # int(0.1 * 64), int(6 * 2); 46 clean
    # backdoor: the plain field, exactly the test-time trigger, attack labels
    assert torch.equal(out[:num_bd], WaNet.apply_trigger(x[:num_bd], art))
    assert torch.equal(labels[:num_bd], torch.full((6,), 3) if rule == "all2one" else (y[:6] + 1) % 10)
    # noise: the field plus fresh uniform noise in [-1, 1] / H, true labels
    gen = torch.Generator().manual_seed(5)
    noisy = noise_grids(art["grid"], num_cross, gen)
    assert ((noisy - art["grid"]).abs() <= 1 / 32 + 1e-6).all() and len(torch.unique(noisy[:, 5, 5, 0])) == 12
    assert torch.equal(out[num_bd:18], warp(x[num_bd:18], noisy))
    assert all(not torch.equal(out[i], WaNet.apply_trigger(x[i:i + 1], art)[0]) for i in range(6, 18))
    assert torch.equal(labels[6:], y[6:])
    # clean rest untouched
    assert torch.equal(out[18:], x[18:])
    assert (out[:18] != x[:18]).flatten(1).any(1).all()


def test_batch_counts():
    gen = torch.Generator().manual_seed(0)
    assert batch_counts(0.1, 2.0, 64, gen) == (6, 12)
    assert batch_counts(0.1, 2.0, 128, gen) == (12, 24)
    assert batch_counts(0.1, 2.0, 80, gen) == (8, 16)  # CIFAR-10's last batch of 128
    assert batch_counts(0.1, 0.0, 64, gen) == (6, 0)
    assert batch_counts(0.5, 1.0, 64, gen) == (32, 32)
    # below one per batch: one sample with probability pratio * B (BackdoorBench's generalize_to_lower_pratio)
    draws = [batch_counts(0.005, 2.0, 64, gen) for _ in range(2000)]
    assert set(draws) == {(0, 0), (1, 2)}
    assert sum(d[0] for d in draws) / 2000 == pytest.approx(0.32, abs=0.05)


def test_hook_is_reproducible_and_keeps_poisoning_labels():
    art = WaNet.make_trigger(cfg(), CIFAR)
    hook = WaNet.batch_hook(cfg(), art, CIFAR)
    x, y = images(64), torch.arange(64) % 10
    a, la = hook(x, y, torch.Generator().manual_seed(3))
    b, lb = hook(x, y, torch.Generator().manual_seed(3))
    c, _ = hook(x, y, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and a.shape == x.shape and 0 <= a.min() and a.max() <= 255
    assert (la[:6] == 0).all() and torch.equal(la[6:], y[6:])
    # the hook is the poisoning step followed by the augmentation, both from the same generator
    gen = torch.Generator().manual_seed(3)
    px, py = poison_batch(x, y, art["grid"], pratio=0.1, cross_ratio=2.0, rule="all2one", target=0,
                          num_classes=10, generator=gen)
    assert torch.equal(a, augment_batch(px, gen, padding=5, degrees=10.0, hflip=True, fill=FILL))


def test_loader_epochs_are_reproducible():
    """What a resumed run relies on: epoch e's poisoned, augmented batches depend only on (seed, e)."""
    art = WaNet.make_trigger(cfg(), CIFAR)
    data = ImageSet(images(150), torch.arange(150) % 10)
    norm = Normalizer(CIFAR.mean, CIFAR.std, "cpu")

    def epoch(e):
        loader = BatchLoader(data, 64, norm, device="cpu", seed=7, batch_hook=WaNet.batch_hook(cfg(), art, CIFAR))
        loader.set_epoch(e)
        return list(loader)
    first, again, other = epoch(1), epoch(1), epoch(2)
    assert [len(y) for _, y in first] == [64, 64, 22]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], other[0][0])
    assert [(y == 0).sum().item() >= 6 for _, y in first][:2] == [True, True]


# ----------------------------------------------------------------------------- WaNet's augmentation

def test_augmentation_is_one_draw_per_batch():
    x = images(16).float()
    flips = set()
    for seed in range(12):
        out = augment_batch(x, torch.Generator().manual_seed(seed), padding=0, degrees=0.0, hflip=True, fill=FILL)
        assert torch.equal(out, x) or torch.equal(out, x.flip(3))  # all images flipped, or none
        flips.add(torch.equal(out, x.flip(3)))
    assert flips == {True, False}
    small, fill = x[:4], FILL.view(1, 3, 1, 1)
    for seed in range(3):
        out = augment_batch(small, torch.Generator().manual_seed(seed), padding=5, degrees=0.0, hflip=False,
                            fill=FILL)
        matches = [(t, left) for t in range(11) for left in range(11)
                   if torch.equal(out, crop(small, torch.tensor(t), torch.tensor(left), 5, fill))]
        assert len(matches) == 1  # one crop offset for the whole batch
    for seed in range(6):  # a rotation is one angle for the batch: it commutes with reordering the batch
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(seed))
        a = augment_batch(x, torch.Generator().manual_seed(seed), padding=5, degrees=10.0, hflip=True, fill=FILL)
        b = augment_batch(x[perm], torch.Generator().manual_seed(seed), padding=5, degrees=10.0, hflip=True, fill=FILL)
        assert torch.equal(a[perm], b)


def test_augmentation_probabilities():
    gen = torch.Generator().manual_seed(0)
    draws = [draw_augment_params(gen, "cpu", 5, 10.0) for _ in range(3000)]
    crop_rate = np.mean([not (int(p.crop_top) == 5 and int(p.crop_left) == 5) for p in draws])
    assert crop_rate == pytest.approx(0.8 * (1 - 1 / 121), abs=0.03)  # offset (5, 5) is also the identity
    angles = np.array([float(p.angle) for p in draws])
    assert np.mean(angles != 0) == pytest.approx(0.5, abs=0.03) and np.abs(angles).max() <= 10
    assert np.mean([bool(p.flip) for p in draws]) == pytest.approx(0.5, abs=0.03)


def test_augmentation_matches_backdoorbench_on_normalised_batches():
    """BackdoorBench applies pad(5, fill 0) + crop, rotate(nearest, fill 0) and hflip to the normalised
    batch; ours on the 0..255 scale with the mean colour as fill gives the same after normalisation."""
    TF = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode
    x = images(8)
    norm = Normalizer(CIFAR.mean, CIFAR.std, "cpu")
    for top, left, angle, flip in [(0, 10, 7.5, True), (5, 5, 0.0, False), (3, 8, -9.25, False), (10, 0, 2.0, True)]:
        params = draw_augment_params(torch.Generator().manual_seed(0), "cpu", 5, 10.0)
        params.crop_top, params.crop_left = torch.tensor(top), torch.tensor(left)
        params.angle, params.flip = torch.tensor(angle, dtype=torch.float64), torch.tensor(flip)
        ours = norm(apply_augment(x, params, padding=5, degrees=10.0, hflip=True, fill=FILL))
        bb = TF.crop(TF.pad(norm(x), 5, fill=0), top, left, 32, 32)
        bb = TF.rotate(bb, angle, InterpolationMode.NEAREST, fill=[0.0, 0.0, 0.0])
        bb = TF.hflip(bb) if flip else bb
        torch.testing.assert_close(ours, bb, atol=1e-5, rtol=0)
        # on the 0..255 scale: exactly torchvision's rotate with the mean colour as fill
        raw = TF.crop(TF.pad(x.float(), 5), top, left, 32, 32)
        padded = crop(x.float(), torch.tensor(top), torch.tensor(left), 5, FILL.view(1, 3, 1, 1))
        inside = raw != 0
        assert torch.equal(padded[inside], raw[inside])
        rot = TF.rotate(padded, angle, InterpolationMode.NEAREST, fill=FILL.tolist())
        assert torch.equal(norm(rot.flip(3) if flip else rot), ours)


# ----------------------------------------------------------------------------- defaults, CLI, end to end

def test_defaults_are_backdoorbenchs():
    conf = yaml.safe_load((ROOT / "config" / "attack" / "wanet" / "default.yaml").read_text())
    assert {k: conf[k] for k in ("k", "s", "grid_rescale", "cross_ratio", "random_crop", "random_rotation", "pratio",
                                 "attack_target", "attack_label_trans")} == \
        dict(k=4, s=0.5, grid_rescale=1, cross_ratio=2, random_crop=5, random_rotation=10, pratio=0.1,
             attack_target=0, attack_label_trans="all2one")
    assert conf["lr_scheduler"] == "MultiStepLR" and conf["steplr_milestones"] == [100, 200, 300, 400]
    proto = yaml.safe_load((ROOT / "config" / "attack" / "prototype" / "cifar10.yaml").read_text())
    assert proto["lr"] == 0.01 and proto["epochs"] == 100 and proto["batch_size"] == 128
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=proto["lr"])
    sched = build_scheduler(opt, Config(**conf), 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.01] * 100  # no decay within BackdoorBench's 100 epochs


def test_bad_input_writes_nothing(capsys, tiny_data, tmp_path):
    base = ["--save_folder_name", "bad", "--dataset_path", str(tiny_data["pickles"]), "--record_dir", str(tmp_path),
            "--model", "preactresnet18_w8", "--epochs", "1"]
    expect_error(capsys, main, [*base, "--k", "0"], "--k 0 must be between 1 and the image size 32")
    expect_error(capsys, main, [*base, "--pratio", "0.5"], "pratio * (1 + cross_ratio) must be at most 1")
    expect_error(capsys, main, [*base, "--random_crop", "-1"], "--random_crop -1")
    expect_error(capsys, main, [*base, "--grid_rescale", "0"], "--grid_rescale 0.0")
    assert not (tmp_path / "bad").exists()


def test_end_to_end_then_d3_and_rebuild(tiny_data, tmp_path):
    data = str(tiny_data["pickles"])
    main(["--save_folder_name", "x", *run_args(tiny_data, tmp_path), *TINY, "--epochs", "1", "--random_hflip", "false"])
    rec = tmp_path / "x"
    assert (rec / "summary.json").is_file()
    # a common flag WaNet has no use for (its own augmentation flips): logged as ignored, not recorded
    assert "wanet does not use --random_hflip" in (rec / "attack.log").read_text()
    assert yaml.safe_load((rec / "config.yaml").read_text())["random_hflip"] is not False
    meta = read_json(rec / "record.json")
    assert meta["attack"] == "wanet" and meta["attack_label_trans"] == "all2one" and meta["attack_target"] == 0
    config = yaml.safe_load((rec / "config.yaml").read_text())
    assert config["lr_scheduler"] == "MultiStepLR" and config["k"] == 4 and config["random_crop"] == 5
    trig = load_tensors(rec / "trigger.safetensors")
    assert set(trig) == {"grid", "noise", "s", "k", "grid_rescale"} and trig["grid"].shape == (1, 32, 32, 2)
    torch.testing.assert_close(trig["grid"], warp_grid(trig["noise"], float(trig["s"]), float(trig["grid_rescale"]),
                                                       32), atol=0, rtol=0)
    idx = load_tensors(rec / "indices.safetensors")
    assert len(idx["train_poison_index"]) == 0  # poisoning happens per batch, never on fixed samples
    assert len(idx["test_backdoor_index"]) == 90  # every non-target test image

    bd, dataset = rebuild_and_defend(rec, data, WaNet)

    # The fixed snapshot of the poisoned training set (BackdoorBench's, after training): one
    # unshuffled pass of batch_size batches, the backdoor and noise samples at each batch's head,
    # rebuilt the same from the record every time.
    from attack.record import load_attack_record, poisoned_train_set
    record = load_attack_record(rec)
    snapshot = poisoned_train_set(record, dataset)
    again = poisoned_train_set(record, dataset)
    assert torch.equal(snapshot.images, again.images) and torch.equal(snapshot.labels, again.labels)
    batch = config["batch_size"]
    changed = torch.nonzero((snapshot.images != dataset.train.images).flatten(1).any(1)).flatten()
    relabelled = torch.nonzero(snapshot.labels != dataset.train.labels).flatten()
    num_bd = int(config["pratio"] * batch)
    assert len(changed) > 0 and set(relabelled.tolist()) <= {b + i for b in range(0, 200, batch) for i in range(num_bd)}
    assert (changed % batch < num_bd * (1 + config["cross_ratio"])).all() and (snapshot.labels[relabelled] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_hook_on_cuda_matches_counts():
    art = WaNet.make_trigger(cfg(), CIFAR)
    hook = WaNet.batch_hook(cfg(), art, CIFAR)
    x, y = images(64).cuda(), (torch.arange(64) % 10).cuda()
    a, la = hook(x, y, torch.Generator("cuda").manual_seed(1))
    b, _ = hook(x, y, torch.Generator("cuda").manual_seed(1))
    assert a.device.type == "cuda" and torch.equal(a, b) and (la[:6] == 0).all() and torch.equal(la[6:], y[6:])
    assert torch.equal(WaNet.apply_trigger(x, art).cpu(), WaNet.apply_trigger(x.cpu(), art))
