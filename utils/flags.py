"""The role each common flag plays beyond its own meaning, in one table: what a record keeps, what
may change when a run is resumed, what tells results apart in a table, what a defense inherits.

Roles (one per flag; a flag not listed is a setting: kept in the record, fixed on resume, and
records whose settings differ are never averaged together):

- ``local``: machine-local (paths, the output's handling): logged, kept out of ``config.yaml`` so a
  record is portable; may change on ``--resume``; not a setting.
- ``runtime``: how a run executes (device, workers, evaluation cadence, mixed precision): kept in the
  record; may change on ``--resume``; not a setting, so tables average over it.
- ``identity``: names a record (seed, output name, attack, model, dataset): kept; fixed on resume;
  tables group by it rather than treating it as a setting.
- ``table``: settings every attack shares that tell whole tables apart (the paper's tables are each at
  one poisoning ratio and target), while an attack's own settings tell rows apart.
"""
from __future__ import annotations

FLAG_ROLES: dict[str, str] = {
    "dataset_path": "local", "cache_dir": "local", "record_dir": "local", "yaml_path": "local",
    "bd_yaml_path": "local", "index": "local", "overwrite": "local", "resume": "local", "pretrained_path": "local",
    "reserve_dataset_path": "local",
    "device": "runtime", "num_workers": "runtime", "eval_batch_size": "runtime", "eval_every": "runtime",
    "amp": "runtime",
    "random_seed": "identity", "save_folder_name": "identity", "attack": "identity", "model": "identity",
    "dataset": "identity",
    "pratio": "table", "attack_target": "table", "attack_label_trans": "table",
}


def flags_with(*roles: str) -> tuple[str, ...]:
    """The flags whose role is one of ``roles``, in the table's order."""
    return tuple(k for k, role in FLAG_ROLES.items() if role in roles)


LOCAL_KEYS = flags_with("local")
RESUMABLE_KEYS = flags_with("local", "runtime")
NOT_SETTINGS = frozenset(flags_with("local", "runtime", "identity"))
TABLE_KEYS = frozenset(flags_with("table"))
# What a defense takes from the attack record's config rather than from its own flags: the record's
# data and model, and the augmentation its model was trained with.
INHERITED_KEYS = ("dataset", "model", "random_crop_padding", "random_hflip")


def portable(cfg, local_keys: tuple[str, ...] = ()) -> dict:
    """The configuration as a record keeps it: without machine-local settings."""
    return {k: v for k, v in cfg.to_dict().items() if k not in LOCAL_KEYS + local_keys}
