"""Input-aware dynamic backdoor: every image gets its own trigger, drawn by a generator trained with
the classifier.

Paper: Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020. Defaults and procedure
follow BackdoorBench's ``attack/inputaware.py`` with its ``config/attack/inputaware/default.yaml``
over ``config/attack/prototype/cifar10.yaml`` (which follow the authors' release):

* two generators of the same encoder-decoder (:class:`EncoderDecoder`): 3x3 conv + BatchNorm
  (momentum 0.05) + ReLU blocks, two per level at 32 / 64 / 128 channels with 2x2 max-pooling
  down, one 128-channel block in the middle, then bilinear x2 upsampling with two blocks per level
  back to 32 channels and an output block without ReLU; the output passes ``tanh(tanh(z)) / (2 +
  1e-7) + 0.5``: tanh twice, as in BackdoorBench, whose generator registers an ``nn.Tanh`` child
  that its layer loop runs before the explicit one, so patterns and masks lie in (0.119, 0.881), not
  (0, 1). The pattern generator G has 3 output channels; the mask generator M has 1, followed by
  the steep threshold ``tanh(20 m - 10) / (2 + 1e-7) + 0.5``. Both read the normalised image.
* The trigger: ``x_bd = x + (G(x) - x) * M(x)`` (on the 0..1 scale; BackdoorBench computes the same
  in normalised space, which is an affine map of it).
* Stage 1, ``clean_train_epochs`` (25) epochs, in :meth:`InputAware.make_trigger`: M alone, Adam
  lr_M 0.01, betas (0.5, 0.9), MultiStepLR schedulerM_milestones [10, 20] x schedulerM_lambda 0.1,
  on the clean training set with the prototype's augmentation (crop 4, flip), batch ``batch_size``;
  loss ``lambda_norm * mean(relu(m1 - mask_density)) + lambda_div * div``, with the diversity term
  ``div = lambda_div * mean(d(x1, x2) / (d(m1, m2) + EPSILON))``, ``d`` the root mean square
  difference per image (lambda_div 1, lambda_norm 100, mask_density 0.032, EPSILON 1e-7; lambda_div
  enters twice as in BackdoorBench). Then M is frozen (eval mode).
* Stage 2, the rest of the attack's ``epochs``, counted as BackdoorBench counts them: its epoch
  counter goes on from stage 1 and stops past ``epochs``, so 100 epochs are 25 mask epochs and 75
  classifier epochs (``epochs - clean_train_epochs``, at least 1; metrics.csv numbers them from 1).
  In every shuffled, augmented batch of B images the first
  ``n = int(pratio * B)`` become backdoor samples ``x + (G(x) - x) * M(x)`` at the attack label, the
  next n cross-trigger samples (image k of them blended with the pattern and mask of ANOTHER image,
  its true label kept), the rest stay clean (below one per batch: one with probability pratio * B,
  BackdoorBench's ``generalize_to_lower_pratio``). The classifier takes the prototype's SGD (lr
  0.01, momentum 0.9, wd 5e-4) with MultiStepLR milestones [100, 200, 300, 400] x 0.1, so its rate
  never decays within its 75 epochs; G takes Adam lr_G 0.01, betas (0.5, 0.9), MultiStepLR
  schedulerG_milestones [200, 300, 400, 500] x schedulerG_lambda 0.1, on ``cross-entropy + div``
  with ``div`` between the backdoor images and the images lending the cross triggers and between
  their patterns. The gradients flow from the classifier's loss into G (the mask is constant).
  As in BackdoorBench and the authors' code, G's gradients are never zeroed (its Adam sees their
  running sum); ``--zero_grad_G true`` zeroes them after every step instead.
* The record keeps both generators (``trigger.safetensors``: ``G.*``, ``M.*`` and the dataset's
  normalisation); the backdoor test set is every non-target test image with its own trigger, made
  by :func:`apply_trigger` from the final generators, and a defense rebuilds it from the record.

Exactness: :func:`apply_trigger` runs both generators in eval mode in float64 on the CPU and rounds
``255 * x_bd`` to the nearest uint8 (ties to even). Float64 results of two machines differ by a few
units in the last place (about 1e-13 on the 0..255 scale), so a rebuilt image differs only if a
value falls that close to a half-integer: about one value in 10^12 or fewer, and the record's
fingerprint check would say so. Float32 (or the GPU) would differ in about one value in 10^3-10^4, so it is kept
for the intermediate evaluations only (:meth:`InputAware.preview_trigger`, float32 on the training
device, rounded the same way; reporting only). The last epoch's evaluation uses the exact set.
The snapshot of the poisoned training set (PDB) is :meth:`InputAware.snapshot_hook`: one unshuffled
pass of ``batch_size`` batches, the first n of each batch backdoored and the next n cross samples,
with the same float64 blend and rounding.

Where this differs from BackdoorBench, and why:
  * the cross-trigger samples take their pattern and mask from another image of the SAME shuffled
    batch, image ``(2n + k) mod B`` for cross sample k (a clean one when 3n <= B), where
    BackdoorBench draws them from a second, independently shuffled loader; the diversity term
    pairs backdoor image k with that same image, as BackdoorBench pairs it with the second
    loader's. In stage 1 the second image of each pair is the previous image of the shuffled batch
    (``x.roll(1)``), so M runs once per batch (BackdoorBench runs it three times, twice on the first
    loader's batch and once on the second's; with batch statistics over the same images the masks
    are the same, but its BatchNorm running statistics move three times per step, ours once);
  * the diversity term is skipped in batches without backdoor samples (BackdoorBench's mean over
    zero samples is NaN there); ``pratio >= 0.5`` is refused (no room for n cross samples);
  * G and M are created with the seed (their own streams), so a rerun makes the same generators;
  * training images stay float (as in BackdoorBench); test images are rounded to uint8 (see
    Exactness; BackdoorBench stores its backdoor test images through its own conversion);
  * the classifier's settings are the common flags (``--lr``, ``--lr_scheduler``,
    ``--steplr_milestones``, ``--steplr_gamma``) in place of BackdoorBench's ``lr_C``,
    ``schedulerC_milestones``, ``schedulerC_lambda``, ``C_lr_scheduler``, with its values;
  * ``--random_rotation`` and ``--random_crop`` are accepted (BackdoorBench's yaml has them) but, as in
    BackdoorBench's Input-aware, unused: the prototype's crop 4 and flip are the augmentation;
  * stage 1 is not checkpointed: an interrupted run restarts it (the attack's epochs are resumed);
  * with ``--amp`` (bf16 autocast, CUDA only) G and M run in bf16 in stage 2 like the classifier;
    stage 1 and the record's trigger are float32 / float64.

Cost: per image the two generators take about 0.2 GMAC, more than the narrow classifier, so stage 1
costs about three narrow-model epochs per epoch and stage 2 about 1.5x the narrow model's epoch
(G on 2n images per batch). The exact float64 test set takes minutes on a CPU (about 7 for the
9,000 CIFAR-10 images on one busy core, 2 in float32): the attack stores it in the cache (named
by its fingerprint), so defenses on the same machine do not rebuild it. A reduced setting for a
CPU: ``--model preactresnet18_w16 --epochs 18 --lr 0.05 --clean_train_epochs 2 --eval_every 6``
(the sweep's ``cpu`` preset: 2 mask epochs, then 16 classifier epochs).

    python attack/inputaware.py --save_folder_name inputaware_demo
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attack.base import Attack, TrainableTrigger, register_attack
from attack.runner import run_attack
from utils.backdoor import attack_labels, stream_generator
from utils.cli import cli_main
from utils.config import resolve_device, str2bool
from utils.errors import UserError
from utils.loader import BatchLoader, Normalizer
from utils.logs import run_logger
from utils.train import fit

OUT_EPS = 1e-7     # the generators' fixed epsilon in tanh(tanh(z)) / (2 + eps) + 0.5
# BackdoorBench's generator registers an nn.Tanh as its last child, so its forward runs it in the
# layer loop and once more explicitly: its output is tanh(tanh(z)) / (2 + eps) + 0.5, in (0.119, 0.881).
# A record whose trigger.safetensors has no ``tanh_passes`` was made with one pass and is rebuilt with one.
TANH_PASSES = 2
BN_MOMENTUM = 0.05
ADAM_BETAS = (0.5, 0.9)


# ----------------------------------------------------------------------------- the generators

def _block(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)]
    return layers + [nn.ReLU()] if relu else layers


class EncoderDecoder(nn.Sequential):
    """The generator of Input-aware (G: ``out_channels`` = image channels; M: 1): 3 levels down
    (2 blocks + max-pool; 32, 64, 128 channels), a middle block, 3 levels up (bilinear x2 + 2
    blocks; 128, 64, 32 channels, the last block to ``out_channels`` without ReLU), then
    ``tanh(z) / (2 + 1e-7) + 0.5``. Input: the normalised image, side divisible by 8."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = 32, levels: int = 3,
                 tanh_passes: int = TANH_PASSES):
        layers: list[nn.Module] = []
        c = in_channels
        for level in range(levels):
            n = width * 2 ** level
            layers += _block(c, n) + _block(n, n) + [nn.MaxPool2d(2)]
            c = n
        layers += _block(c, c)
        for level in range(levels):
            last = level == levels - 1
            out = out_channels if last else c // 2
            layers += [nn.Upsample(scale_factor=2, mode="bilinear")] + _block(c, c) + _block(c, out, relu=not last)
            c = out
        super().__init__(*layers)
        self.tanh_passes = tanh_passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = super().forward(x)
        for _ in range(self.tanh_passes):
            z = torch.tanh(z)
        return z / (2 + OUT_EPS) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """The mask's steep threshold, ``tanh(20 m - 10) / (2 + 1e-7) + 0.5``."""
    return torch.tanh(m * 20 - 10) / (2 + OUT_EPS) + 0.5


def seeded_generator(seed: int, stream: str, in_channels: int, out_channels: int) -> EncoderDecoder:
    """A freshly initialised generator (PyTorch's default init) from the seed's named stream."""
    g = stream_generator(seed, stream)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=g)))
        return EncoderDecoder(in_channels, out_channels)


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_generator(artifacts: dict[str, torch.Tensor], prefix: str, dtype=torch.float32,
                   device="cpu") -> EncoderDecoder:
    """G or M from the record's artifacts, in eval mode, without touching any random generator."""
    state = {k[len(prefix) + 1:]: v.clone() for k, v in artifacts.items() if k.startswith(prefix + ".")}
    convs = sorted((int(k.split(".")[0]), v) for k, v in state.items() if k.endswith(".weight") and v.dim() == 4)
    first, last = convs[0][1], convs[-1][1]
    passes = int(artifacts["tanh_passes"]) if "tanh_passes" in artifacts else 1
    with torch.device("meta"):
        net = EncoderDecoder(first.shape[1], last.shape[0], width=first.shape[0], tanh_passes=passes)
    net.load_state_dict(state, assign=True)
    return net.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- the trigger

def _normalise(x01: torch.Tensor, artifacts) -> torch.Tensor:
    mean = artifacts["mean"].to(x01).view(1, -1, 1, 1)
    std = artifacts["std"].to(x01).view(1, -1, 1, 1)
    return (x01 - mean) / std


@torch.no_grad()
def blend(targets: torch.Tensor, sources: torch.Tensor, artifacts: dict[str, torch.Tensor], *,
          dtype=torch.float64, device="cpu", chunk: int = 128) -> torch.Tensor:
    """uint8 ``targets`` with the pattern and mask that G and M draw for uint8 ``sources`` (the same
    images: the backdoor trigger; others: cross triggers), ``round(255 * (x + (G - x) * M))`` in
    ``dtype`` on ``device``; uint8 out, on the targets' device."""
    if targets.shape[0] == 0:
        return targets.clone()
    netG = load_generator(artifacts, "G", dtype, device)
    netM = load_generator(artifacts, "M", dtype, device)
    out = torch.empty_like(targets)
    for i in range(0, targets.shape[0], chunk):
        x = targets[i:i + chunk].to(device, dtype) / 255
        s = _normalise(sources[i:i + chunk].to(device, dtype) / 255, artifacts)
        bd = x + (netG(s) - x) * threshold(netM(s))
        out[i:i + chunk] = (bd * 255).round_().clamp_(0, 255).to(torch.uint8).to(targets.device)
    return out


def apply_trigger(images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The backdoor trigger of a record, exactly: float64 on the CPU (see the module docstring)."""
    return blend(images, images, artifacts)


def batch_count(pratio: float, batch: int) -> int:
    """Backdoor (and cross) samples in a batch: ``int(pratio * B)``; below one, one with probability
    ``pratio * B`` (drawn from torch's global generator, which checkpoints hold); at most (B - 1) // 2."""
    expected = pratio * batch
    n = int(expected) if expected >= 1 else int(torch.rand(1).item() < expected)
    return min(n, (batch - 1) // 2)


def cross_sources(n: int, batch: int, device=None) -> torch.Tensor:
    """Positions of the images lending their triggers to the cross samples ``n .. 2n-1``: ``2n + k``
    (mod B), another image of the batch (clean ones when 3n <= B)."""
    return (2 * n + torch.arange(n, device=device)) % batch


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).mean(dim=(1, 2, 3)).sqrt()


def diversity(x1, x2, p1, p2, eps: float) -> torch.Tensor:
    """mean over the pairs of ``d(x1, x2) / (d(p1, p2) + eps)``: large when different inputs get
    similar triggers (BackdoorBench's diversity loss, before its lambda_div)."""
    return (rms_distance(x1, x2) / (rms_distance(p1, p2) + eps)).mean()


def mask_loss(netM: nn.Module, x: torch.Tensor, cfg) -> tuple[torch.Tensor, dict]:
    """Stage 1's loss on a normalised batch: mask norm above the density plus diversity (the second
    image of each pair is the previous one in the shuffled batch)."""
    m1 = threshold(netM(x))
    m2 = m1.roll(1, 0)
    norm = F.relu(m1 - cfg.mask_density).mean()
    div = diversity(x, x.roll(1, 0), m1, m2, cfg.EPSILON) * cfg.lambda_div
    loss = cfg.lambda_norm * norm + cfg.lambda_div * div
    return loss, {"mask_loss": loss.detach(), "mask_norm": norm.detach(), "mask_div": div.detach(),
                  "mask_mean": m1.detach().mean()}


class InputAwareTrigger(TrainableTrigger):
    """Stage 2's pattern generator G with its Adam and MultiStepLR, and the frozen mask generator M."""

    def __init__(self, cfg, artifacts: dict[str, torch.Tensor], spec, device):
        self.cfg, self.spec, self.device = cfg, spec, torch.device(device)
        self.mean, self.std = artifacts["mean"], artifacts["std"]
        self.netG = load_generator(artifacts, "G", device=self.device).train()
        self.netM = load_generator(artifacts, "M", device=self.device).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.netG.parameters(), cfg.lr_G, betas=ADAM_BETAS)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.schedulerG_milestones),
                                                              cfg.schedulerG_lambda)
        norm = Normalizer(spec.mean, spec.std, self.device)
        self._mean01, self._std01 = norm.mean / 255, norm.std / 255  # pattern [0, 1] -> normalised

    def poison(self, x: torch.Tensor, y: torch.Tensor):
        """The batch as the classifier sees it (normalised), G's patterns kept for the diversity term."""
        cfg, b = self.cfg, x.shape[0]
        n = batch_count(cfg.pratio, b)
        self.netG.train()
        src = x[cross_sources(n, b, x.device)]
        with torch.no_grad():
            m_bd, m_src = threshold(self.netM(x[:n])), threshold(self.netM(src))
        p_bd = (self.netG(x[:n]) - self._mean01) / self._std01
        p_src = (self.netG(src) - self._mean01) / self._std01
        bd = x[:n] + (p_bd - x[:n]) * m_bd
        cross = x[n:2 * n] + (p_src - x[n:2 * n]) * m_src
        inputs = torch.cat([bd, cross, x[2 * n:]]).contiguous(memory_format=torch.channels_last)
        labels = torch.cat([attack_labels(y[:n], cfg.attack_label_trans, cfg.attack_target, self.spec.num_classes),
                            y[n:]])
        return inputs, labels, n, (x[:n], src, p_bd, p_src)

    def loss(self, model, x, y):
        inputs, labels, n, pairs = self.poison(x, y)
        logits = model(inputs)
        ce = F.cross_entropy(logits, labels)
        div = diversity(*pairs, self.cfg.EPSILON) * self.cfg.lambda_div if n else ce.new_zeros(())
        correct = (logits.argmax(1) == labels).float()
        logs = {"train_loss": ce.detach(), "train_acc": correct.mean(), "div_loss": div.detach()}
        return ce + div, logs

    def step(self) -> None:
        self.optimizer.step()
        if self.cfg.zero_grad_G:
            self.optimizer.zero_grad(set_to_none=True)

    def epoch_end(self) -> None:
        self.scheduler.step()

    def artifacts(self) -> dict[str, torch.Tensor]:
        return {**_prefixed("G", self.netG), **_prefixed("M", self.netM), "mean": self.mean, "std": self.std,
                "tanh_passes": torch.tensor(self.netG.tanh_passes)}

    def state_dict(self) -> dict:
        grads = {k: p.grad for k, p in self.netG.named_parameters() if p.grad is not None}
        return {"G": self.netG.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "grad": grads}

    def load_state_dict(self, state: dict) -> None:
        self.netG.load_state_dict(state["G"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for k, p in self.netG.named_parameters():
            p.grad = state["grad"][k].to(p.device).clone() if k in state["grad"] else None


# ----------------------------------------------------------------------------- the attack

@register_attack
class InputAware(Attack):
    """Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020), BackdoorBench defaults: per-image triggers from a generator trained with the classifier."""  # noqa: E501
    name = "inputaware"
    learns_trigger = True
    cache_rebuilt_test_set = True  # the exact float64 set takes minutes on a CPU
    epochs_help = ("epochs in all, BackdoorBench's count: the mask generator's --clean_train_epochs, then the "
                   "classifier for the rest (at least 1): 100 = 25 + 75")

    @classmethod
    def classifier_epochs(cls, cfg) -> int:
        """BackdoorBench's epoch counter goes on from the mask stage (it starts at clean_train_epochs + 1)
        and stage 2 stops once it passes ``--epochs``: ``epochs - clean_train_epochs`` classifier
        epochs, at least one (its loop runs once before the check)."""
        return max(1, cfg.epochs - cfg.clean_train_epochs)

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--lr_G", type=float, help="pattern generator G: Adam learning rate")
        parser.add_argument("--lr_M", type=float, help="mask generator M (stage 1): Adam learning rate")
        parser.add_argument("--schedulerG_milestones", type=int, nargs="+", help="G's MultiStepLR milestones (epochs)")
        parser.add_argument("--schedulerM_milestones", type=int, nargs="+", help="M's MultiStepLR milestones (epochs)")
        parser.add_argument("--schedulerG_lambda", type=float, help="G's MultiStepLR gamma")
        parser.add_argument("--schedulerM_lambda", type=float, help="M's MultiStepLR gamma")
        parser.add_argument("--lambda_div", type=float, help="weight of the diversity loss")
        parser.add_argument("--lambda_norm", type=float, help="weight of the mask-norm loss (stage 1)")
        parser.add_argument("--mask_density", type=float, help="mask density above which the norm loss acts")
        parser.add_argument("--EPSILON", type=float, help="epsilon of the diversity loss's denominator")
        parser.add_argument("--clean_train_epochs", type=int, help="stage 1: epochs of mask-generator training")
        parser.add_argument("--zero_grad_G", type=str2bool, help="zero G's gradients after each step "
                            "(false: BackdoorBench's and the authors' running sum)")
        parser.add_argument("--random_rotation", type=float, help="accepted for BackdoorBench's yaml; unused there too")
        parser.add_argument("--random_crop", type=int, help="accepted for BackdoorBench's yaml; unused there too")

    @classmethod
    def check_flags(cls, cfg, spec) -> None:
        def finite(name, low=0.0, strict=False):
            v = getattr(cfg, name)
            ok = isinstance(v, (int, float)) and math.isfinite(v) and (v > low if strict else v >= low)
            return ok, f"--{name} {v} must be a finite number {'>' if strict else '>='} {low}"
        checks = [finite("lr_G", strict=True), finite("lr_M", strict=True), finite("lambda_div"),
                  finite("lambda_norm"), finite("EPSILON", strict=True), finite("schedulerG_lambda", strict=True),
                  finite("schedulerM_lambda", strict=True),
                  (0 < cfg.mask_density <= 1, f"--mask_density {cfg.mask_density} must be in (0, 1]"),
                  (cfg.clean_train_epochs >= 0, f"--clean_train_epochs {cfg.clean_train_epochs} must be >= 0"),
                  (cfg.pratio < 0.5, f"--pratio {cfg.pratio} leaves no room for as many cross samples; "
                                     f"Input-aware needs pratio < 0.5"),
                  (spec.image_size % 8 == 0, f"Input-aware's generators need an image side divisible by 8, "
                                             f"not {spec.image_size}")]
        for name in ("schedulerG_milestones", "schedulerM_milestones"):
            v = list(getattr(cfg, name) or [])
            checks.append((all(m > 0 for m in v) and v == sorted(v), f"--{name} {v} must be increasing epochs > 0"))
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @classmethod
    def make_trigger(cls, cfg, spec, dataset=None) -> dict[str, torch.Tensor]:
        """Stage 1: the mask generator M trained on the clean training data, then frozen; G freshly
        initialised. Both from the seed."""
        cls.check_flags(cfg, spec)
        channels = 3
        netM = seeded_generator(cfg.random_seed, "inputaware-M", channels, 1)
        netG = seeded_generator(cfg.random_seed, "inputaware-G", channels, channels)
        if cfg.clean_train_epochs > 0:
            if dataset is None:
                raise UserError("Input-aware's mask generator needs the clean training data")
            train_mask(netM, dataset.train, cfg, spec, resolve_device(cfg.device))
        netM.cpu().eval()
        return {**_prefixed("G", netG), **_prefixed("M", netM), "mean": torch.tensor(spec.mean, dtype=torch.float64),
                "std": torch.tensor(spec.std, dtype=torch.float64), "tanh_passes": torch.tensor(TANH_PASSES)}

    @staticmethod
    def apply_trigger(images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        return apply_trigger(images, artifacts)

    @classmethod
    def preview_trigger(cls, images, artifacts):
        """float32 on the images' device: for intermediate evaluations only (see the docstring)."""
        return blend(images, images, artifacts, dtype=torch.float32, device=images.device, chunk=1024)

    @classmethod
    def select_poison_index(cls, cfg, labels: torch.Tensor) -> torch.Tensor:
        """None: Input-aware poisons a share of every batch afresh, so ``train_poison_index`` is empty."""
        return torch.empty(0, dtype=torch.long)

    @classmethod
    def trainable_trigger(cls, cfg, artifacts, spec, device):
        return InputAwareTrigger(cfg, artifacts, spec, device)

    @classmethod
    def snapshot_hook(cls, cfg, artifacts, spec):
        """BackdoorBench's poisoned training set after training: per unshuffled batch, the first n
        images backdoored (attack labels), the next n cross samples (true labels), the exact blend."""
        def rule(x, y, generator):
            b = x.shape[0]
            expected = cfg.pratio * b
            n = int(expected) if expected >= 1 else int(torch.rand(1, generator=generator).item() < expected)
            n = min(n, (b - 1) // 2)
            x, y = x.clone(), y.clone()
            x[:n] = apply_trigger(x[:n], artifacts)
            y[:n] = attack_labels(y[:n], cfg.attack_label_trans, cfg.attack_target, spec.num_classes)
            x[n:2 * n] = blend(x[n:2 * n], x[cross_sources(n, b)], artifacts)
            return x, y
        return rule


def train_mask(netM: nn.Module, train, cfg, spec, device) -> None:
    """Stage 1 (see the module docstring) through the shared loop, logged per epoch."""
    logger = run_logger()
    netM.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(netM.parameters(), cfg.lr_M, betas=ADAM_BETAS)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.schedulerM_milestones), cfg.schedulerM_lambda)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=stream_generator(cfg.random_seed, "inputaware-mask-batches")))
    loader = BatchLoader(train, cfg.batch_size, Normalizer(spec.mean, spec.std, device), device=device, shuffle=True,
                         crop_padding=cfg.random_crop_padding, hflip=cfg.random_hflip, seed=seed)

    def report(epoch, stats):
        logger.info("inputaware stage 1 (mask generator) epoch %d/%d  %s", epoch + 1, cfg.clean_train_epochs,
                    "  ".join(f"{k}={v:.4g}" for k, v in stats.items() if k.startswith("mask")))
    fit(netM, loader, optimizer, scheduler, lambda m, x, y: mask_loss(m, x, cfg), epochs=cfg.clean_train_epochs,
        on_epoch_end=report, desc="inputaware mask generator")
    netM.requires_grad_(False)


def main(argv: list[str] | None = None):
    return run_attack(InputAware, argv)


if __name__ == "__main__":
    cli_main(main)
