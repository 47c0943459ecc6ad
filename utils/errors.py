"""One exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input a user can fix: the message names what is wrong and how to fix it."""
