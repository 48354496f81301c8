"""The engine the stages share: training loop, batching, scoring, the logit-cache format,
checkpoints, splits, model loading, config, locks, atomic IO and work records.

It may import ``scd_pipeline.math`` and ``scd_pipeline.errors``; it never imports a stage. What two
stages share (an artifact's location, how to read it) lives here.
"""
