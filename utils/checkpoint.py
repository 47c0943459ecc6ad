"""Per-epoch checkpoints: the model, optimiser and RNG state of a run, so ``--resume`` continues
bit for bit, refused when the settings that change the result differ."""
from __future__ import annotations

from pathlib import Path

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
        state = safe_torch_load(path)
        if not isinstance(state, dict) or not {"config", "rows", "stages", "extra"} <= set(state):
            raise UserError(f"{path} is not a checkpoint of this toolkit; pass --overwrite to start again")
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


