"""Low Frequency: a smooth universal perturbation, kept to low spatial frequencies, added to poisoned images.

Paper: Zeng, Park, Mao, Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective",
ICCV 2021 (official code: github.com/YiZeng623/frequency-backdoor, Sec5_Smooth_Trigger). BackdoorBench
calls the attack ``lf``. Defaults follow BackdoorBench's ``lf`` on CIFAR-10 (its config/attack/lf/default.yaml,
the CIFAR-10 prototype): PreAct-ResNet18, 100 epochs, SGD lr 0.01, cosine schedule, pratio 0.1,
target 0, all2one, poison indices drawn from all classes (its LowFrequency class is a BadNet subclass).

The trigger, as BackdoorBench's ``SimpleAdditiveTrigger`` (utils/bd_img_transform/patch.py, used by
utils/aggregate_block/bd_attack_generate.py for both the training and the test set):

    x' = uint8(clip(float64(x) + float64(p), 0, 255))

per pixel and channel, ``p`` an H x W x C array; the cast to uint8 truncates, so a fractional pattern
value adds its floor; no scaling of ``p``. The record's ``trigger.safetensors`` holds ``pattern``, the
float64 [C, H, W] values (float64 holds any uint8 or float32 file exactly).

``--lowFrequencyPatternPath`` (BackdoorBench's flag) takes a trigger ``.npy`` of BackdoorBench's kind,
or a folder, which resolves to BackdoorBench's file name ``{dataset}_{model}_0_255.npy`` inside it
(e.g. ``--lowFrequencyPatternPath ../shared/data/backdoorbench-resource/lowFrequency`` takes
``cifar10_preactresnet18_0_255.npy``: 32 x 32 x 3 uint8, values 0..51). As BackdoorBench: a 4-D array
gives its first entry, a 2-D array is repeated over the three channels, a 3-D one is H x W x C.
Files are read with ``numpy.load(allow_pickle=False)``: a pickled (object) array is refused, never run.

Without the flag (the default) the trigger is made as the paper describes, and cached:
  1. a clean model: ``--lf_clean_model_path`` (a ``.safetensors`` or weights-only ``.pt`` state dict of
     ``--model``), else one trained here on the clean training data with the attack's own model and
     training settings (cached too, under ``<cache>/lowFrequency/clean_models/``);
  2. a targeted universal perturbation of that model toward ``--attack_target`` (all2all: untargeted),
     found by batched gradient steps on ``--lf_uap_samples`` clean training images (all2one: not of the
     target class), ``--lf_uap_passes`` passes, step ``--lf_uap_step`` (pixel levels, along the low-passed
     gradient scaled to max 1). After every step the perturbation is low-pass filtered and rescaled
     to the range 0..51, as the paper's code does (its ``normalization``: min-max to [0, 0.2] on the
     0..1 scale over all channels at once, which is what BackdoorBench's published files hold: min 0,
     max 51, e.g. an all-zero green channel in cifar10_preactresnet18; so the pattern's mean level
     follows its shape, and a purely uniform gradient moves nothing). The pattern of the pass with
     the highest target rate on those images is kept, rounded to integers: uint8 H x W x C, 0..51.
     The low-pass filter is ideal, in the Fourier domain: frequencies with radius at most ``--lf_cutoff``
     (a fraction of the Nyquist frequency on each axis) are kept. 0.125 keeps radius 2 cycles per
     image on 32 x 32 images, where 97.5% of the non-constant energy of BackdoorBench's published
     cifar10_preactresnet18 file lies; the paper's Gaussian (sigma 6 pixels) scales with the image
     the same way, so 64 x 64 images keep radius 4;
  3. the file is written as ``<cache>/lowFrequency/{dataset}_{model}-{key}/{dataset}_{model}_0_255.npy``
     (``<cache>`` = ``--cache_dir`` or the dataset cache's default), ``key`` a hash of the training
     data, the clean model (its settings or its weights file), the seed, target, label rule and the
     ``lf_*`` settings; a later run with the same settings reuses it, and the folder can be passed
     to ``--lowFrequencyPatternPath`` here or to BackdoorBench. The log says where it was written.
Training the clean model is part of ``make_trigger``: it runs before the record is started.

Differences from BackdoorBench, and why:
  * BackdoorBench resizes each image to the dataset's size before adding the pattern, and a pattern
    of another size fails there with a numpy broadcast error; here images are already that size and
    a pattern of another size is refused in one line before anything is written. An H x W x 1 array
    is broadcast over the channels, as numpy broadcasting does there;
  * its trigger class calls ``astype(np.float)``, an alias NumPy 1.24 removed; the arithmetic here
    is the same float64 addition, clip and truncation in batched torch;
  * a float pattern with values in [0, 1] (not all zero) is read as on the [0, 1] scale and multiplied
    by 255, with a warning: BackdoorBench ships such files for vgg19_bn and vit_b_16 on CIFAR-10
    (1 x 32 x 32 x 3 float32, 0..0.2; times 255 gives 0..51, the range of its uint8 files) and adds
    them unscaled. There x + p with 0 <= p < 1 is truncated back to x by the cast to uint8, so not
    one pixel changes (its ``SimpleAdditiveTrigger``, utils/bd_img_transform/patch.py): its runs
    with those files flip labels on unchanged images. An all-zero pattern (no trigger either way),
    non-finite values and non-numeric arrays are refused;
  * BackdoorBench's prototypes set ``amp: False`` (fp32; its lf yaml sets no ``amp``); this
    project's prototypes turn on bf16 autocast on CUDA (no effect on CPU), here as for every
    attack; ``--amp false`` gives fp32;
  * the generator: BackdoorBench's resource/lowFrequency/generate_pattern.py runs the paper's
    sequential DeepFool-based UAP on 100 images with a zero-padded Gaussian blur (sigma 6 px), feeds
    the model un-normalised [0, 1] images although it was trained on normalised ones, and saves
    ``v * 255 + 127.5`` (values about 127..178), unlike the 0..51 files it ships. Here the UAP is
    batched gradient descent on the device with the model's own normalisation, an ideal Fourier
    low-pass (so the result is band-limited up to rounding to integers), and the range of the
    shipped files. The paper's code also switches the target to the "dominant" label; here the
    target stays ``--attack_target``, as in BackdoorBench's generator.

    python attack/lf.py --save_folder_name lf_demo \
        --lowFrequencyPatternPath ../shared/data/backdoorbench-resource/lowFrequency
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attack.base import Attack, register_attack
from attack.runner import run_attack
from models import create_model, new_model
from utils.backdoor import random_subset
from utils.cli import cli_main
from utils.config import resolve_device, seed_everything
from utils.datasets import tensor_fingerprint
from utils.device import place_model
from utils.errors import UserError
from utils.loader import BatchLoader, Normalizer
from utils.logs import run_logger
from utils.progress import progress
from utils.readers import read_npy
from utils.record import load_into, load_tensors, load_weights, save_tensors, sha256_file, write_json
from utils.sources import cache_root
from utils.train import build_optimizer, build_scheduler, cross_entropy_loss, fit

PATTERN_RANGE = 51.0  # 0.2 * 255: the paper's normalisation, the range of BackdoorBench's published files
GENERATOR_VERSION = 1  # part of the cache key: bump when the generator's output changes
TRAIN_KEYS = ("epochs", "batch_size", "lr", "lr_scheduler", "steplr_milestones", "steplr_stepsize", "steplr_gamma",
              "client_optimizer", "sgd_momentum", "wd", "random_seed", "random_crop_padding", "random_hflip", "amp")


def bb_file_name(dataset: str, model: str) -> str:
    """BackdoorBench's name for a low-frequency trigger (attack/lf.py there)."""
    return f"{dataset}_{model}_0_255.npy"


def add_pattern(images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] plus the pattern [C, H, W] in float64, clipped to [0, 255], truncated to uint8."""
    total = images.to(torch.float64) + pattern.to(images.device, torch.float64)
    return total.clamp_(0, 255).to(torch.uint8)


def band_mask(height: int, width: int, cutoff: float, device=None) -> torch.Tensor:
    """bool [H, W] in ``torch.fft.fft2``'s layout: the coefficients whose frequency radius, in units of
    the Nyquist frequency on each axis, is at most ``cutoff``."""
    fy = torch.fft.fftfreq(height, device=device, dtype=torch.float64) * 2
    fx = torch.fft.fftfreq(width, device=device, dtype=torch.float64) * 2
    return fy[:, None] ** 2 + fx[None, :] ** 2 <= cutoff ** 2 + 1e-9


def low_pass(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Ideal low-pass of ``x`` [..., H, W] in the Fourier domain (the image taken as periodic)."""
    mask = band_mask(x.shape[-2], x.shape[-1], cutoff, device=x.device)
    return torch.fft.ifft2(torch.fft.fft2(x) * mask).real.to(x.dtype)


def rescale(v: torch.Tensor) -> torch.Tensor:
    """Min-max over all channels at once to [0, PATTERN_RANGE] (the paper's ``normalization`` x 255)."""
    lo, hi = v.min(), v.max()
    return (v - lo) / (hi - lo).clamp_min(1e-12) * PATTERN_RANGE


# ----------------------------------------------------------------------------- trigger files

def resolve_pattern_path(value: str, dataset: str, model: str) -> Path:
    """The .npy file ``--lowFrequencyPatternPath`` names: the file itself, or BackdoorBench's name in a folder."""
    path = Path(value).expanduser()
    name = bb_file_name(dataset, model)
    if path.is_dir():
        candidate = path / name
        if not candidate.is_file():
            raise UserError(f"--lowFrequencyPatternPath {path} is a folder without {name} (looked for {candidate}); "
                            f"BackdoorBench names triggers {{dataset}}_{{model}}_0_255.npy: give the file itself, "
                            f"or leave the flag unset to generate one")
        return candidate
    if not path.is_file():
        raise UserError(f"--lowFrequencyPatternPath {path} does not exist; give a trigger .npy file, a folder "
                        f"holding {name}, or leave the flag unset to generate one")
    return path


def read_pattern_file(path: Path, image_size: int) -> np.ndarray:
    """A BackdoorBench low-frequency trigger as a finite numeric H x W x 3 array, shapes handled as
    BackdoorBench's bd_attack_generate.py does; one-line errors for anything else."""
    arr = read_npy(path, f"trigger file {path}", "save the H x W x C pattern as a plain numeric array with numpy.save")
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "uif":
        raise UserError(f"trigger file {path} holds {getattr(arr, 'dtype', type(arr).__name__)} values; a trigger "
                        f"must be numbers (BackdoorBench's are uint8 0..255)")
    shape = arr.shape
    if arr.ndim == 4 and shape[0] >= 1:
        if shape[0] > 1:
            run_logger().info("trigger file %s holds %d patterns; taking the first, as BackdoorBench does", path,
                              shape[0])
        arr = arr[0]
    elif arr.ndim == 2:
        arr = np.stack((arr,) * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[:2] != (image_size, image_size) or arr.shape[2] not in (1, 3):
        raise UserError(f"trigger file {path} has shape {'x'.join(map(str, shape)) or 'scalar'}; the images are "
                        f"{image_size}x{image_size}x3 and BackdoorBench's layout is H x W x C (or 1 x H x W x C, "
                        f"or H x W for one channel)")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if not np.isfinite(arr).all():
        raise UserError(f"trigger file {path} holds NaN or infinite values")
    if arr.dtype.kind == "f" and arr.min() >= 0 and 0 < arr.max() <= 1:
        # BackdoorBench's published VGG19-BN and ViT-B/16 files for CIFAR-10 are float 0..0.2, which it
        # adds unscaled to uint8 images: the cast back to uint8 truncates every sum to the original pixel.
        run_logger().warning("trigger file %s holds values in [0, 1] (max %.4g), the [0, 1] image scale; scaled to "
                             "0..255 here (max %.4g). BackdoorBench adds such a file to uint8 images unscaled and "
                             "truncates the sum back to uint8, so values below 1 change no pixel (its 0..0.2 files "
                             "change none: its figures for them measure label flips on unchanged images)",
                             path, float(arr.max()), float(arr.max()) * 255)
        return arr.astype(np.float64) * 255
    if arr.min() >= 0 and arr.max() < 1:
        raise UserError(f"trigger file {path} holds only zeros: added to the images it changes no pixel; give a "
                        f"pattern on the 0..255 scale")
    return arr


def pattern_tensor(arr_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr_hwc.transpose(2, 0, 1)).astype(np.float64))


# ----------------------------------------------------------------------------- the generator

def universal_low_frequency_pattern(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                                    normalizer: Normalizer, *, target: int, rule: str, passes: int, step: float,
                                    batch_size: int, cutoff: float, seed: int) -> tuple[np.ndarray, float]:
    """A universal low-frequency perturbation of ``model`` on uint8 ``images`` [N, C, H, W]: uint8
    H x W x C, 0..PATTERN_RANGE, and its success rate on ``images`` (all2one: share classified as
    ``target``; all2all: share whose prediction changes). Batched on the model's device."""
    device = next(model.parameters()).device
    model.eval().requires_grad_(False)
    x_all, y_all = images.to(device), labels.to(device)
    n, c, h, w = x_all.shape
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def predict(pattern: torch.Tensor | None) -> torch.Tensor:
        out = []
        for i in range(0, n, 512):
            x = x_all[i:i + 512]
            out.append(model(normalizer(x if pattern is None else add_pattern(x, pattern))).argmax(1))
        return torch.cat(out)

    clean_pred = predict(None)

    def success(pattern: torch.Tensor) -> float:
        pred = predict(pattern)
        hit = pred == target if rule == "all2one" else pred != clean_pred
        return hit.float().mean().item()

    v = rescale(low_pass(torch.randn((c, h, w), generator=gen, dtype=torch.float32), cutoff)).to(device)
    best, best_rate = None, -1.0
    steps = -(-n // batch_size)
    bar = progress(total=passes * steps, desc="lf trigger (UAP)", unit="step")
    for p in range(passes):
        order = torch.randperm(n, generator=gen).to(device)
        for b in range(steps):
            idx = order[b * batch_size:(b + 1) * batch_size]
            v_var = v.clone().requires_grad_(True)
            logits = model(normalizer((x_all[idx].float() + v_var).clamp(0, 255)))
            if rule == "all2one":  # towards the target: descend its cross-entropy
                loss = -F.cross_entropy(logits, torch.full_like(y_all[idx], target))
            else:  # all2all: away from the true labels
                loss = F.cross_entropy(logits, y_all[idx])
            (grad,) = torch.autograd.grad(loss, v_var)
            g = low_pass(grad, cutoff)
            v = rescale(low_pass(v + step * g / g.abs().max().clamp_min(1e-20), cutoff))
            bar.update()
        quantized = v.round().clamp_(0, PATTERN_RANGE)
        rate = success(quantized)
        bar.set_postfix(rate=f"{rate:.3f}")
        run_logger().info("lf trigger: pass %d/%d, %s rate %.4f on %d clean training images", p + 1, passes,
                          "target" if rule == "all2one" else "fooling", rate, n)
        if rate > best_rate:
            best, best_rate = quantized, rate
    bar.close()
    return best.permute(1, 2, 0).to(torch.uint8).cpu().numpy(), best_rate


# ----------------------------------------------------------------------------- the attack

@register_attack
class LowFrequency(Attack):
    """Low Frequency smooth-trigger attack (Zeng et al., ICCV 2021), BackdoorBench defaults; --lowFrequencyPatternPath takes BackdoorBench's .npy (or its folder), else the trigger is generated and cached."""  # noqa: E501
    name = "lf"
    local_keys = ("lowFrequencyPatternPath", "lf_clean_model_path")

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--lowFrequencyPatternPath", type=str,
                            help="trigger .npy (H x W x C, 0..255 scale, added to the images), or a folder holding "
                                 "BackdoorBench's {dataset}_{model}_0_255.npy; unset: generate one (and cache it)")
        parser.add_argument("--lf_clean_model_path", type=str,
                            help="generator: weights of a clean --model (.safetensors or weights-only .pt state "
                                 "dict); unset: train one with the attack's settings (cached)")
        parser.add_argument("--lf_uap_passes", type=int, help="generator: passes over the UAP images")
        parser.add_argument("--lf_uap_step", type=float,
                            help="generator: step along the low-passed gradient, in pixel levels (range 0..51)")
        parser.add_argument("--lf_uap_samples", type=int,
                            help="generator: clean training images (not of the target class) the UAP uses")
        parser.add_argument("--lf_cutoff", type=float,
                            help="generator: kept frequency radius, as a fraction of the Nyquist frequency "
                                 "(0.125 = 2 cycles per image on 32x32)")

    @classmethod
    def check_flags(cls, cfg, spec) -> None:
        if not cfg.lowFrequencyPatternPath:
            _check_generator_flags(cfg, spec)

    @classmethod
    def make_trigger(cls, cfg, spec, dataset=None) -> dict[str, torch.Tensor]:
        cls.check_flags(cfg, spec)
        if cfg.lowFrequencyPatternPath:
            path = resolve_pattern_path(cfg.lowFrequencyPatternPath, spec.name, cfg.model)
            arr = read_pattern_file(path, spec.image_size)
            run_logger().info("low-frequency trigger from %s: %s %s, values %g..%g", path,
                              "x".join(map(str, arr.shape)), arr.dtype, float(arr.min()), float(arr.max()))
            return {"pattern": pattern_tensor(arr)}
        if dataset is None:
            raise UserError("generating the low-frequency trigger needs the clean training data")
        return {"pattern": pattern_tensor(cls.generated_pattern(cfg, spec, dataset))}

    @staticmethod
    def apply_trigger(images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        return add_pattern(images, artifacts["pattern"])

    @classmethod
    def generated_pattern(cls, cfg, spec, dataset) -> np.ndarray:
        """The generated trigger (uint8 H x W x 3), from the cache when this setting made one before."""
        logger = run_logger()
        root = _cache_root(cfg)
        train_fp = tensor_fingerprint(dataset.train.images, dataset.train.labels)
        clean = {"dataset": spec.name, "train_fingerprint": train_fp, "model": cfg.model,
                 **{k: getattr(cfg, k, None) for k in TRAIN_KEYS}}
        weights = Path(cfg.lf_clean_model_path).expanduser() if cfg.lf_clean_model_path else None
        if weights is not None:
            if not weights.is_file():
                raise UserError(f"--lf_clean_model_path {weights} does not exist; give a .safetensors or weights-only "
                                f".pt state dict of --model {cfg.model}, or leave it unset to train one")
            clean = {"model": cfg.model, "weights_sha256": sha256_file(weights)}
        settings = {"generator": GENERATOR_VERSION, "dataset": spec.name, "train_fingerprint": train_fp,
                    "model": cfg.model, "clean_model": clean, "random_seed": cfg.random_seed,
                    "attack_target": cfg.attack_target, "attack_label_trans": cfg.attack_label_trans,
                    "uap_batch_size": cfg.batch_size, "range": PATTERN_RANGE,
                    **{k: getattr(cfg, k) for k in ("lf_uap_passes", "lf_uap_step", "lf_uap_samples", "lf_cutoff")}}
        folder = root / f"{spec.name}_{cfg.model}-{_key(settings)}"
        target = folder / bb_file_name(spec.name, cfg.model)
        if target.is_file():
            try:
                arr = read_pattern_file(target, spec.image_size)
                logger.info("low-frequency trigger from the cache: %s", target)
                return arr
            except UserError as e:
                logger.warning("the cached trigger is unusable (%s); generating it again", e)

        device = resolve_device(cfg.device)
        if weights is not None:
            model = create_model(cfg.model, spec.num_classes, pretrained=False)
            load_into(model, load_weights(weights), str(weights))
            model = place_model(model, device)
            logger.info("lf trigger: clean model from %s", weights)
        else:
            model = _trained_clean_model(cfg, spec, dataset, device, root, clean)

        images, labels = _uap_images(cfg, dataset)
        arr, rate = universal_low_frequency_pattern(
            model, images, labels, Normalizer(spec.mean, spec.std, device), target=cfg.attack_target,
            rule=cfg.attack_label_trans, passes=cfg.lf_uap_passes, step=cfg.lf_uap_step,
            batch_size=cfg.batch_size, cutoff=cfg.lf_cutoff, seed=cfg.random_seed)
        try:
            _save_npy(target, arr)
            write_json(folder / "settings.json", {**settings, "uap_images": len(images), "success_rate": rate})
            logger.info("low-frequency trigger written to %s (%s rate %.4f on %d clean training images); pass the "
                        "file or its folder to --lowFrequencyPatternPath to reuse it", target,
                        "target" if cfg.attack_label_trans == "all2one" else "fooling", rate, len(images))
        except OSError as e:
            logger.warning("could not cache the low-frequency trigger at %s (%s); it is used uncached", target, e)
        return arr


def _check_generator_flags(cfg, spec) -> None:
    if cfg.lf_uap_passes < 1:
        raise UserError(f"--lf_uap_passes {cfg.lf_uap_passes} must be at least 1")
    if not cfg.lf_uap_step > 0:
        raise UserError(f"--lf_uap_step {cfg.lf_uap_step} must be positive (pixel levels; the pattern spans 0..51)")
    if cfg.lf_uap_samples < 1:
        raise UserError(f"--lf_uap_samples {cfg.lf_uap_samples} must be at least 1")
    if not 0 < cfg.lf_cutoff <= 1:
        raise UserError(f"--lf_cutoff {cfg.lf_cutoff} is outside (0, 1]; it is the kept frequency radius as a "
                        f"fraction of the Nyquist frequency (0.125 keeps {spec.image_size / 16:g} cycles per image on "
                        f"these {spec.image_size}x{spec.image_size} images)")


def _uap_images(cfg, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``lf_uap_samples`` clean training images drawn with the seed (all2one: not of the target class)."""
    labels = dataset.train.labels
    pool = torch.arange(len(labels)) if cfg.attack_label_trans != "all2one" else \
        torch.nonzero(labels != cfg.attack_target).flatten()
    if len(pool) == 0:
        raise UserError("the training set has no image outside the target class to compute the trigger on")
    chosen = pool[random_subset(len(pool), min(cfg.lf_uap_samples, len(pool)), cfg.random_seed, "lf_uap")]
    return dataset.train.images[chosen], labels[chosen]


def _trained_clean_model(cfg, spec, dataset, device, root: Path, settings: dict) -> torch.nn.Module:
    """A clean ``cfg.model`` trained as the attack trains (same settings, clean data), cached by its settings."""
    logger = run_logger()
    cache = root / "clean_models" / f"{spec.name}_{cfg.model}-{_key(settings)}.safetensors"
    model = create_model(cfg.model, spec.num_classes, pretrained=False)
    if cache.is_file():
        try:
            load_into(model, load_tensors(cache), str(cache))
            logger.info("lf trigger: clean model from the cache: %s", cache)
            return place_model(model, device)
        except UserError as e:
            logger.warning("the cached clean model is unusable (%s); training it again", e)
    logger.info("lf trigger: training a clean %s for %d epochs on %d clean images (skip this with "
                "--lf_clean_model_path or --lowFrequencyPatternPath)", cfg.model, cfg.epochs, len(dataset.train))
    seed_everything(cfg.random_seed)
    model = place_model(new_model(cfg, spec.num_classes), device)
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, cfg.epochs)
    loader = BatchLoader(dataset.train, cfg.batch_size, Normalizer(spec.mean, spec.std, device), device=device,
                         shuffle=True, crop_padding=cfg.random_crop_padding, hflip=cfg.random_hflip,
                         seed=cfg.random_seed)

    def report(epoch: int, stats: dict) -> None:
        logger.info("lf clean model: epoch %d/%d  train_loss=%.4g  train_acc=%.4g", epoch + 1, cfg.epochs,
                    stats.get("train_loss", float("nan")), stats.get("train_acc", float("nan")))

    fit(model, loader, optimizer, scheduler, cross_entropy_loss, epochs=cfg.epochs, amp=cfg.amp,
        on_epoch_end=report, desc="lf clean model")
    try:
        save_tensors(cache, model.state_dict())
        logger.info("lf trigger: clean model written to %s (or pass your own with --lf_clean_model_path)", cache)
    except OSError as e:
        logger.warning("could not cache the clean model at %s (%s)", cache, e)
    return model


def _cache_root(cfg) -> Path:
    base = cache_root(getattr(cfg, "cache_dir", None))
    return base / "lowFrequency"


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None):
    return run_attack(LowFrequency, argv)


if __name__ == "__main__":
    cli_main(main)
