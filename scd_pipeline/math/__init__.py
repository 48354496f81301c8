"""The pure math: divergences, schedules, weighting, metrics, statistics, the curriculum's rules.

Functions of tensors, arrays and frames: no file system, no models loaded, nothing of the package
imported but ``scd_pipeline.errors`` and other math modules.
"""
