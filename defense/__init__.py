"""Defenses: one script each, declaring itself with a :class:`defense.base.Defense` (its algorithm,
flags, checks and what it holds), beside the framework they share: the declaration and the defender's
data (base.py) and the runner (runner.py)."""
