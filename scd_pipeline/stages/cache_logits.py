"""The cache stage: ``scd-pipeline cache-logits --checkpoint K`` (format in :mod:`logit_cache`)."""

from __future__ import annotations

from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.checkpoints import checkpoint_entry, read_checkpoints
from scd_pipeline.engine.config import task_dir, write_effective_config
from scd_pipeline.engine.locking import Artifact
from scd_pipeline.engine.logit_cache import (
    SYNTHETIC,
    cache_path,
    checkpoint_identity,
    dataset_fingerprint_for,
    decoded_dir,
    write_logit_cache,
)
from scd_pipeline.engine.tokenization import check_data_tokenizer, tokenizer_fingerprint


def cache_logits(config: dict, checkpoint: int, synthetic: bool = False) -> dict:
    """Cache teacher checkpoint ``checkpoint`` over split ``cache.split`` (or, ``synthetic``, over
    IOA's ``data/synthetic.parquet``).

    Writes ``{task_dir}/logits/ckpt-{k}.parquet`` (``logits/synthetic/ckpt-{k}.parquet``) +
    ``.meta.json`` and the effective config; returns the sidecar record plus ``path``.
    """
    from scd_pipeline.engine.models import load_model

    settings = config["cache"]
    root = task_dir(config)
    teacher_dir = root / "teacher"
    entry = checkpoint_entry(read_checkpoints(teacher_dir), checkpoint)
    checkpoint_dir = teacher_dir / entry["path"]
    split = SYNTHETIC if synthetic else settings["split"]
    frame = read_split(root / "data" / f"{split}.parquet")
    fingerprint, source = dataset_fingerprint_for(root / "data", split)
    model, tokenizer = load_model(checkpoint_dir)
    check_data_tokenizer(root / "data", tokenizer, checkpoint_dir)
    identity = {"task": config["task"], "split": split, "dataset_fingerprint": fingerprint,
                "dataset_fingerprint_source": source, "tokenizer": tokenizer_fingerprint(tokenizer),
                "checkpoint": checkpoint_identity(checkpoint_dir, checkpoint)}
    out = cache_path(root, checkpoint, synthetic)
    meta = write_logit_cache(model, tokenizer, frame, out, identity, top_k=settings["top_k"],
                             dtype=settings["dtype"], temperature=settings["temperature"],
                             batch_size=settings["batch_size"], rows_per_group=settings["rows_per_group"],
                             max_new_tokens=config["evaluate"]["max_new_tokens"])
    write_effective_config(config, out.parent, f"cache-logits.ckpt-{checkpoint}")
    return {**meta, "path": str(out)}


def artifacts(config: dict, *, checkpoint: int, synthetic: bool = False) -> list[Artifact]:
    """What ``cache-logits --checkpoint K [--synthetic]`` writes: the cache, its metadata, its
    decoded copy and config."""
    logits = task_dir(config) / "logits" / ("synthetic" if synthetic else "")
    cache = logits / f"ckpt-{checkpoint}.parquet"
    return [Artifact(cache, (cache, logits / f"ckpt-{checkpoint}.meta.json", decoded_dir(cache),
                             logits / f"cache-logits.ckpt-{checkpoint}.config.yaml"))]
