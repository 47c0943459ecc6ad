"""FT: vanilla fine-tuning of all weights on the defender's reserved clean data.

The baseline "FT" of the D3 paper's Table 1, with BackdoorBench's ``ft`` settings
(config/defense/ft/config.yaml): 100 epochs, batch 256, SGD lr 0.01 momentum 0.9 wd 5e-4,
cosine schedule, 5% of the clean training set, the attack's training augmentation.

Where this differs from BackdoorBench: with ``--amp`` (the default) on CUDA the fine-tuning runs under
bf16 autocast, where BackdoorBench's trainer runs it under fp16 autocast with a gradient scaler (its ft
config sets ``amp: True``). ``--amp false`` gives fp32; whether the difference changes the results is
not yet measured here.

    python defense/ft.py --result_file badnet_demo
"""
from __future__ import annotations

from defense.base import Defense
from defense.runner import run_defense
from utils.cli import cli_main
from utils.train import build_optimizer, build_scheduler, cross_entropy_loss, fit


def purify(model, clean, cfg, report):
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, cfg.epochs)
    fit(model, clean.loader(cfg.batch_size, cfg.random_seed), optimizer, scheduler, cross_entropy_loss,
        epochs=cfg.epochs, amp=cfg.amp, on_epoch_end=report, desc="ft")
    return model


DEFENSE = Defense("ft", purify, __doc__.splitlines()[0])


def main(argv: list[str] | None = None):
    return run_defense(DEFENSE, argv)


if __name__ == "__main__":
    cli_main(main)
