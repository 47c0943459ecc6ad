"""Attacks: one file each, registered with utils.attack.register_attack."""
