"""Prototype: a clean model trained exactly as the attacks train theirs, with nothing poisoned.

BackdoorBench's ``prototype`` (its attack/prototype.py): the reference a backdoored model's clean
accuracy is compared with. It writes an ordinary attack record (so tables and defenses read it like
any other) whose poisoned training set is the clean one and whose trigger is the identity, so its
"ASR" is the rate at which clean non-target test images are classified as the target class: the
floor an attack's ASR is measured against. ``--pratio`` is ignored.

    python attack/prototype.py --save_folder_name clean_demo
"""
from __future__ import annotations

import torch

from attack.base import Attack, register_attack
from attack.runner import run_attack
from utils.cli import cli_main


@register_attack
class Prototype(Attack):
    """Clean training (BackdoorBench's prototype): the same model and schedule, no poisoned sample."""
    name = "prototype"

    @classmethod
    def make_trigger(cls, cfg, spec, dataset=None) -> dict[str, torch.Tensor]:
        return {}

    @staticmethod
    def apply_trigger(images: torch.Tensor, artifacts: dict[str, torch.Tensor]) -> torch.Tensor:
        return images

    @classmethod
    def select_poison_index(cls, cfg, labels: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=torch.long)


def main(argv: list[str] | None = None):
    return run_attack(Prototype, argv)


if __name__ == "__main__":
    cli_main(main)
