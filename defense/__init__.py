"""Post-training defenses: one file each, each defining add_arguments() and purify()."""
