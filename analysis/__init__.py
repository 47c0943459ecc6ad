"""Analyses: read-only scripts that look at finished, verified attack records and defense outputs
(the loss landscape between an attacked and a defended model, the weight changes a defense made).
They judge defenses and may read the test sets; they are not defenses and write only under a record's
``analysis/`` folder (or ``--out``)."""
