"""Sweeps and their tables: running a list of attacks, then a list of defenses on each attack record,
for each seed, as jobs through the real command-line scripts; and turning the records they leave into
the D3 paper's tables.

The sweep side: ``presets`` (how big a sweep is), ``settings`` (a job's flags compared with the
settings a finished run was made with), ``jobs`` (the plan: one job per script run, and whether each
is done), ``executors`` (running the jobs: a pool on this machine, SLURM or submitit's local
executor), ``progress`` (the line per finished job). The table side: ``collect`` (records read into
rows), ``tables`` (what a table holds), ``grouping`` (rows grouped into tables), ``formats`` (text,
Markdown, LaTeX, CSV), ``table_files`` (the files written, the cost figure), ``paper`` (the paper's
attack and defense order and its reported figures). The commands: ``launch.py`` runs a sweep,
``results_table.py`` builds its tables.
"""
