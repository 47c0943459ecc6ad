"""Attacks: one script each (registered with :func:`attack.base.register_attack`), beside the framework
they share: the attack API (base.py), the runner (runner.py) and the record reader (record.py)."""
