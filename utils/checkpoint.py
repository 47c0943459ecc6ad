"""Per-epoch checkpoints: the model, optimiser and RNG state of a run, so ``--resume`` continues
bit for bit, refused when the settings that change the result differ."""
from __future__ import annotations

from pathlib import Path

import torch

from utils.errors import UserError
from utils.record import safe_torch_load

CHECKPOINT = "checkpoint.pt"


class Checkpoint:
    """``checkpoint.pt`` of a running script: its portable config, the per-epoch rows and, per
    training stage, the state after the last finished epoch, plus ``extra`` tensors the script
    needs to resume (an attack's poison indices). Plain containers and tensors only, loaded with
    ``weights_only=True``."""

    def __init__(self, path: Path, config: dict, extra: dict | None = None):
        self.path = path
        self.state = {"config": config, "rows": [], "stages": {}, "extra": dict(extra or {})}

    @classmethod
    def load(cls, path: Path, config: dict, ignore_keys: tuple[str, ...]) -> "Checkpoint":
        """A saved checkpoint, refused when the settings that shape the result changed since."""
        try:
            state = safe_torch_load(path)
        except UserError as e:  # damaged, or a pickle that would run code: never resumed from
            raise UserError(f"{e}; pass --overwrite to start the run again") from None
        problem = _shape_problem(state)
        if problem:
            raise UserError(f"{path} is not a checkpoint of this toolkit ({problem}); it is damaged or was edited: "
                            f"pass --overwrite to start again")
        saved = state["config"]
        changed = sorted(k for k in (set(saved) | set(config)) - set(ignore_keys) if saved.get(k) != config.get(k))
        if changed:
            raise UserError(f"cannot resume from {path}: settings changed ({', '.join(changed)}); "
                            f"resume with the original settings or pass --overwrite to start again")
        checkpoint = cls(path, config)
        checkpoint.state = state
        return checkpoint

    @property
    def rows(self) -> list[dict]:
        return self.state["rows"]

    @property
    def extra(self) -> dict:
        return self.state["extra"]

    def epochs_done(self) -> int:
        return sum(s["epoch"] + 1 for s in self.state["stages"].values())


def _shape_problem(state) -> str:
    """What in a loaded checkpoint is not of the shape :meth:`Checkpoint.save` writes ('' if nothing):
    checked before anything reads it, so a damaged or edited file is one line, not a traceback."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a mapping"
    missing = [k for k in ("config", "rows", "stages", "extra") if k not in state]
    if missing:
        return f"no {missing[0]!r}"
    for key, kind in (("config", dict), ("rows", list), ("stages", dict), ("extra", dict)):
        if not isinstance(state[key], kind):
            return f"{key!r} is {type(state[key]).__name__}, not {kind.__name__}"
    if not all(isinstance(row, dict) for row in state["rows"]):
        return "a row of 'rows' is not a mapping"
    for name, stage in state["stages"].items():
        if not isinstance(stage, dict) or not {"epoch", "rng", "objects"} <= set(stage):
            return f"stage {name!r} is not a mapping of epoch, rng and objects"
        if not isinstance(stage["epoch"], int) or isinstance(stage["epoch"], bool) or stage["epoch"] < 0:
            return f"stage {name!r}: 'epoch' is {stage['epoch']!r}, not a count"
        if not isinstance(stage["rng"], dict) or not isinstance(stage["rng"].get("cpu"), torch.Tensor):
            return f"stage {name!r}: 'rng' is not a random generator state"
        if not isinstance(stage["objects"], dict) or not all(isinstance(v, dict) for v in stage["objects"].values()):
            return f"stage {name!r}: 'objects' is not a mapping of state dicts"
    return ""
