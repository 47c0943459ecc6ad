"""Training throughput: this toolkit's device-resident pipeline against a BackdoorBench-style one.

The BackdoorBench-style side mimics its data path: a torch DataLoader whose workers turn each
sample into a PIL image and run torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor and Normalize, then copy the batch to the device. Both sides train the same model with
the same step (SGD, bf16 autocast and channels_last on CUDA), so only the data path differs.

    python tools/bench_throughput.py --dataset_path ../shared/data/cifar10-jpeg.zip [--steps 100]

``--models a,b,c`` instead measures each model's training and evaluation images/s on the
device-resident pipeline (batch 128 for training, the evaluator's 512 for evaluation), side by side:

    python tools/bench_throughput.py --dataset_path ... --models preactresnet18_w16,vgg19_bn_w16,vit_tiny_test
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from models import create_model
from utils.device import place_model
from utils.evaluate import predict
from utils.loader import BatchLoader, Normalizer
from utils.sources import load_dataset


def train_steps(model, optimizer, batches, steps: int, device) -> float:
    """Images per second over ``steps`` steps, after a few warm-up steps."""
    it = iter(batches)
    done, start = 0, None
    for step in range(steps + 5):
        if step == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, done = time.perf_counter(), 0
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(batches)
            x, y = next(it)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += y.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def pil_loader(dataset, batch_size: int, workers: int, spec):
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image

    transform = T.Compose([T.RandomCrop(spec.image_size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(spec.mean, spec.std)])
    images = dataset.train.images.permute(0, 2, 3, 1).numpy()
    labels = dataset.train.labels.numpy()

    class PilDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(np.ascontiguousarray(images[i]))), int(labels[i])

    return torch.utils.data.DataLoader(PilDataset(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                       pin_memory=True, drop_last=True, persistent_workers=workers > 0)


def eval_images_per_s(model, images, normalizer, device, repeats: int = 2) -> float:
    """The evaluator's inference (eval mode, batch 512, bf16 autocast on CUDA), after one warm-up pass."""
    predict(model, images[:512], normalizer, device=device, amp=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        predict(model, images, normalizer, device=device, amp=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * images.shape[0] / (time.perf_counter() - start)


def compare_models(names: list[str], dataset, steps: int, device) -> None:
    spec = dataset.spec
    normalizer = Normalizer(spec.mean, spec.std, device)
    loader = BatchLoader(dataset.train, 128, normalizer, device=device, crop_padding=4, hflip=True, drop_last=True,
                         channels_last=True)
    test = dataset.test.images[:2048].to(device)
    print(f"\nper-model throughput on {device} "
          f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), {steps} training steps of 128")
    print(f"  {'model':<22}{'params':>10}{'train img/s':>14}{'eval img/s':>13}")
    for name in names:
        model = place_model(create_model(name, spec.num_classes, pretrained=False), device)  # the runs' placement
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        train = train_steps(model, optimizer, loader, steps, device)
        evaluate = eval_images_per_s(model, test, normalizer, device)
        params = sum(p.numel() for p in model.parameters())
        print(f"  {name:<22}{params / 1e6:>9.2f}M{train:>14.0f}{evaluate:>13.0f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset_path", required=True)
    p.add_argument("--model", default="preactresnet18")
    p.add_argument("--models", default=None, help="comma-separated: compare these models' training and "
                   "evaluation images/s instead")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    dataset = load_dataset("cifar10", a.dataset_path)
    spec = dataset.spec
    if a.models:
        return compare_models([m.strip() for m in a.models.split(",") if m.strip()], dataset, a.steps, device)

    def fresh():
        model = place_model(create_model(a.model, spec.num_classes, pretrained=False), device)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    results = {}
    for bs in (128, 512):
        loader = BatchLoader(dataset.train, bs, Normalizer(spec.mean, spec.std, device), device=device,
                             crop_padding=4, hflip=True, drop_last=True, channels_last=True)
        results[f"device-resident, batch {bs}"] = train_steps(*fresh(), loader, a.steps, device)
    for w in a.workers:
        results[f"PIL DataLoader, {w} workers, batch 128"] = train_steps(
            *fresh(), pil_loader(dataset, 128, w, spec), a.steps, device)
    print(f"\ntraining throughput on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}),"
          f" model {a.model}, {a.steps} steps each")
    ours = results["device-resident, batch 128"]
    for name, ips in results.items():
        print(f"  {name:<40}{ips:10.0f} images/s   ({ours / ips:.2f}x slower than ours at batch 128)"
              if name.startswith("PIL") else f"  {name:<40}{ips:10.0f} images/s")


if __name__ == "__main__":
    main()
