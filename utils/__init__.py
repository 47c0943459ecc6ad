"""The framework's ground floor, under models, attacks, defenses and sweeps; each file owns one thing.

Data: ``datasets`` (specs, uint8 image sets), ``readers`` and ``layouts`` (the on-disk formats),
``sources`` (``--dataset_path`` to cached tensors), ``loader`` (batches on the device), ``backdoor``
(poisoning). Runs: ``config`` (flags and YAML), ``flags`` (each common flag's role), ``cli`` (one-line
errors, interruptions), ``logs``, ``output`` (output folders as transactions), ``checkpoint``,
``report`` (plan, per-epoch CSV, curves), ``plots``, ``progress``, ``device`` (model placement),
``train`` (the loop, optimisers, schedules), ``sam``, ``evaluate`` and ``metrics``. Records:
``record`` (data-only files, manifests, the schema), ``errors``.
"""
