"""scd-pipeline: scheduled checkpoint distillation for domain LLMs.

The package is laid out as the pipeline. ``stages/`` holds one module per ``scd-pipeline`` command
and per ``workflow/rules/*.smk`` file, with the same names (prepare_model, prepare_data, sft,
cache_logits, estimate_subdomains, ioa_plan, synthesize, distill, evaluate, report): a stage reads
its inputs as artifacts on disk, writes its outputs, declares them in ``artifacts()``, and imports
no other stage. ``engine/`` is the machinery the stages share (training loop, batching, scoring,
the logit-cache format, checkpoints, splits, model loading, config, locks, atomic IO, work
records); it imports the math, never a stage. ``math/`` is pure functions on tensors and frames
(divergences, schedules, weighting, metrics, statistics, the curriculum's rules); it imports
nothing of the package but ``errors`` and never touches the file system. ``cli.py`` is the one
face (it may import anything); ``errors.py`` is the exceptions every room raises.
``tests/test_layout.py`` holds the package to these rules.
"""

__version__ = "0.1.0"
