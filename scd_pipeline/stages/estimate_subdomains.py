"""Student- and teacher-favoured subdomains (``scd-pipeline estimate-subdomains``), SPEC 4.1-4.2.

Per sample of the cached split (``cache.split``, default train) it compares the fixed SFT
student's gold NLL, L_S^SFT, with every teacher checkpoint's gold NLL L_c from that checkpoint's
logit cache. "NLL" is always the per-sample mean over completion tokens (``nll_mean``), at
temperature 1, for the student and the teacher alike.

- SFS/TFS: a sample is student-favoured (SFS) iff L_S^SFT < L_T* (T* = the best checkpoint);
  every other sample (ties included) is teacher-favoured (TFS).
- AW against each checkpoint c: sigmoid(log L_S^SFT - log L_c) = L_S^SFT / (L_S^SFT + L_c)
  (:func:`scd_pipeline.math.weighting.adaptive_weight`).
- Gap decomposition, for a per-sample risk r (loss: the NLL; metric: the error 1 - score, the
  score being the task metric of the sample, :func:`scd_pipeline.engine.scoring.sample_score`, the same
  the caches store and evaluation reports), with d = r_S - r_T* per sample:
  R(S) - R(T*) = mean_all(d) = share_SFS * mean_SFS(d) + share_TFS * mean_TFS(d), reported as
  ``gap = advantage_sfs + deficit_tfs`` (signed: student minus teacher, so in loss the SFS term is
  <= 0 and the TFS term >= 0).
- KL(a || b) between checkpoints: :func:`scd_pipeline.math.schedules.cache_kl` (each cache renormalised
  at temperature 1, its tail spread uniformly over the ids it does not list), averaged over all
  completion tokens of the probe set, for every pair; the row of T* is the KL(T* || c) term that
  SCD distillation reads from ``subdomains.json``.
- Where the NLL comes from (``subdomains.estimate``): ``in_sample`` (the paper) takes each row's
  own NLL, although the SFT student and every checkpoint trained on that row, so a model that
  memorised it looks competent there; ``heldout_tag`` gives every row its tag's mean NLL and mean
  score over the validation split, which no model trained on (T* and the SFT student are scored
  there once per checkpoint), so SFS/TFS and AW say where each model is better on rows it did not
  see, at the resolution of a tag (a tag without validation rows takes the all-tag mean).
- Probe set: ``subdomains.probe_size`` sample ids drawn with ``random.Random(seed)`` from the
  split's ids in sorted order (all of them when the split is smaller), listed sorted in
  ``subdomains.json`` so distillation measures KL(S_k || c) on the same samples.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.checkpoints import checkpoint_indices, read_checkpoints
from scd_pipeline.engine.config import task_dir, write_effective_config
from scd_pipeline.engine.io import atomic_path, write_json
from scd_pipeline.engine.locking import Artifact
from scd_pipeline.engine.logit_cache import LogitCache, open_task_cache
from scd_pipeline.engine.models import is_model_dir
from scd_pipeline.engine.scoring import predict_split
from scd_pipeline.errors import DataError, ModelError
from scd_pipeline.math.schedules import CACHE_KL_DEFINITION, cache_kl, mean_token_kl
from scd_pipeline.math.stats import decompose_gap
from scd_pipeline.math.weighting import adaptive_weight

NLL_DEFINITION = "per-sample gold NLL, mean over completion tokens, temperature 1 (cache column nll_mean)"
SFS_RULE = "student-favoured (sfs) iff student_sft_nll < nll_ckpt_{best}; ties are teacher-favoured"


def probe_sample_ids(sample_ids: Sequence[str], size: int, seed: int) -> list[str]:
    """The fixed probe set: ``size`` ids drawn with ``random.Random(seed)`` from the sorted ids
    (independent of row order), returned sorted; all ids when there are at most ``size``."""
    ordered = sorted(str(s) for s in sample_ids)
    if size >= len(ordered):
        return ordered
    return sorted(random.Random(seed).sample(ordered, size))


def _aligned(samples: pd.DataFrame, stats: pd.DataFrame, what: str) -> pd.DataFrame:
    """``stats`` rows in the order of ``samples.sample_id``; every sample present exactly once."""
    indexed = stats.set_index("sample_id")
    if not indexed.index.is_unique or set(indexed.index) != set(samples["sample_id"]):
        raise DataError(f"{what}: its samples are not those of the split ({len(indexed)} vs "
                        f"{len(samples)} rows); re-run it on the current data")
    return indexed.loc[samples["sample_id"]].reset_index()


def subdomain_table(samples: pd.DataFrame, student: pd.DataFrame,
                    checkpoints: Mapping[int, pd.DataFrame], best_index: int) -> pd.DataFrame:
    """One row per sample: ``sample_id, tag, student_sft_nll, student_sft_score``, then per
    checkpoint ``nll_ckpt_{k}``, ``score_ckpt_{k}``, then ``sfs`` and ``aw_ckpt_{k}``.

    ``samples`` has ``sample_id, tag``; ``student`` and each checkpoint frame have the cache's
    per-sample columns (``sample_id, nll_mean, score``).
    """
    if best_index not in checkpoints:
        raise DataError(f"best checkpoint {best_index} has no cache among {sorted(checkpoints)}")
    table = samples[["sample_id", "tag"]].reset_index(drop=True).copy()
    student = _aligned(table, student, "student_sft scores")
    table["student_sft_nll"] = student["nll_mean"].to_numpy(np.float64)
    table["student_sft_score"] = student["score"].to_numpy(np.float64)
    for index in sorted(checkpoints):
        stats = _aligned(table, checkpoints[index], f"cache of checkpoint {index}")
        table[f"nll_ckpt_{index}"] = stats["nll_mean"].to_numpy(np.float64)
        table[f"score_ckpt_{index}"] = stats["score"].to_numpy(np.float64)
    table["sfs"] = table["student_sft_nll"] < table[f"nll_ckpt_{best_index}"]
    student_nll = torch.tensor(table["student_sft_nll"].to_numpy(), dtype=torch.float64)
    for index in sorted(checkpoints):
        teacher_nll = torch.tensor(table[f"nll_ckpt_{index}"].to_numpy(), dtype=torch.float64)
        table[f"aw_ckpt_{index}"] = adaptive_weight(student_nll, teacher_nll).numpy()
    return table


def _gaps(table: pd.DataFrame, best_index: int) -> dict:
    sfs = table["sfs"].to_numpy()
    loss = decompose_gap(table["student_sft_nll"], table[f"nll_ckpt_{best_index}"], sfs)
    metric = decompose_gap(1.0 - table["student_sft_score"].to_numpy(float),
                           1.0 - table[f"score_ckpt_{best_index}"].to_numpy(float), sfs)
    return {"samples": len(table), "sfs_share": float(sfs.mean()), "loss": loss, "metric": metric}


def summarize_subdomains(table: pd.DataFrame, best_index: int) -> dict:
    """SFS share, loss and metric gap decompositions (overall and per tag), mean AW per checkpoint."""
    checkpoints = sorted(int(c.removeprefix("aw_ckpt_")) for c in table.columns if c.startswith("aw_ckpt_"))
    return {
        "best_index": best_index,
        "checkpoints": checkpoints,
        "nll": NLL_DEFINITION,
        "rule": SFS_RULE.format(best=best_index),
        "risk": {"loss": "nll (lower is better)", "metric": "error = 1 - score (the task metric per sample)"},
        "decomposition": "gap = R(S) - R(T*) = mean_all(d) = share_SFS*mean_SFS(d) + share_TFS*mean_TFS(d)"
                         " = advantage_sfs + deficit_tfs, d = r_S - r_T* per sample",
        **_gaps(table, best_index),
        "per_tag": {str(tag): _gaps(group, best_index) for tag, group in table.groupby("tag", sort=True)},
        "adaptive_weight_mean": {str(k): float(table[f"aw_ckpt_{k}"].mean()) for k in checkpoints},
    }


ALL_TAGS = "(all tags)"  # tag_means' row of the all-row means


def tag_means(tags: Sequence[str], stats: pd.DataFrame) -> pd.DataFrame:
    """Mean ``nll_mean`` and ``score`` per tag of per-sample ``stats`` (rows in ``tags`` order),
    plus the all-row means as the row ``ALL_TAGS`` (for tags without rows)."""
    frame = stats[["nll_mean", "score"]].reset_index(drop=True).assign(tag=[str(t) for t in tags])
    means = frame.groupby("tag", sort=True)[["nll_mean", "score"]].mean()
    means.loc[ALL_TAGS] = frame[["nll_mean", "score"]].mean()
    return means


def carried_by_tag(samples: pd.DataFrame, means: pd.DataFrame) -> pd.DataFrame:
    """Per-sample stats for ``samples`` (``sample_id, tag``): each row gets its tag's means (the
    all-row means when its tag has none)."""
    rows = [means.loc[str(tag) if str(tag) in means.index else ALL_TAGS] for tag in samples["tag"]]
    return pd.DataFrame({"sample_id": samples["sample_id"].to_numpy(),
                         "nll_mean": [float(r["nll_mean"]) for r in rows],
                         "score": [float(r["score"]) for r in rows]})


def _scored_stats(model, tokenizer, frame: pd.DataFrame, config: dict, where: str) -> pd.DataFrame:
    scored = predict_split(model, tokenizer, frame, config["cache"]["batch_size"],
                           config["evaluate"]["max_new_tokens"], where=where)
    return pd.DataFrame({"sample_id": scored["sample_id"], "nll_mean": -scored["gold_logprob"] / scored["gold_tokens"],
                         "score": scored["score"]})


def heldout_tag_stats(config: dict, frame: pd.DataFrame, student, tokenizer, checkpoints: dict,
                      indices: Sequence[int]) -> tuple[pd.DataFrame, dict[int, pd.DataFrame], dict]:
    """``subdomains.estimate: heldout_tag``: the SFT student's and every checkpoint's per-tag means
    on the validation split, carried to the rows of ``frame``; and what was measured."""
    from scd_pipeline.engine.checkpoints import checkpoint_entry
    from scd_pipeline.engine.models import load_model

    root = task_dir(config)
    val_file = root / "data" / "val.parquet"
    val = read_split(val_file)
    if val.empty:
        raise DataError(f"{val_file}: no validation rows, which subdomains.estimate: heldout_tag measures on; "
                        "use in_sample or a task with a validation split")
    samples = frame[["sample_id", "tag"]]
    means = {"student": tag_means(val["tag"], _scored_stats(student, tokenizer, val, config, str(val_file)))}
    for index in indices:
        model, teacher_tokenizer = load_model(root / "teacher" / checkpoint_entry(checkpoints, index)["path"])
        means[index] = tag_means(val["tag"], _scored_stats(model, teacher_tokenizer, val, config, str(val_file)))
        del model
    missing = sorted({str(t) for t in samples["tag"]} - {str(t) for t in val["tag"]})
    record = {"split": "val", "rows": len(val), "tags_without_rows": missing,
              "per_tag_nll": {str(key): {str(tag): float(v) for tag, v in m["nll_mean"].items()}
                              for key, m in means.items()}}
    return (carried_by_tag(samples, means["student"]),
            {index: carried_by_tag(samples, means[index]) for index in indices}, record)


def checkpoint_kl_matrix(caches: Mapping[int, LogitCache], probe_ids: Sequence[str]) -> dict[int, dict[int, float]]:
    """``{a: {b: KL(a || b)}}`` between every pair of checkpoint caches: mean over all completion
    tokens of the probe samples of :func:`scd_pipeline.math.schedules.cache_kl`."""
    targets = {index: cache.targets(probe_ids) for index, cache in caches.items()}
    counts = {index: tuple(cache.token_counts(probe_ids)) for index, cache in caches.items()}
    if len(set(counts.values())) > 1:
        raise DataError("checkpoint caches disagree on completion token counts of the probe samples; "
                        "re-run cache-logits for every checkpoint on the current data")
    return {a: {b: mean_token_kl([cache_kl(targets[a], targets[b])]) for b in sorted(targets)}
            for a in sorted(targets)}


def estimate_subdomains(config: dict, synthetic: bool = False) -> dict:
    """The stage: write ``{task_dir}/subdomains.parquet`` and ``subdomains.json``; return the summary.

    Reads the split ``cache.split``, ``teacher/checkpoints.json``, every checkpoint's verified cache
    and ``student_sft/`` (a full model or a LoRA adapter; scored over the split by the same
    scoring pass as the caches and evaluation, for L_S^SFT and its score). With ``synthetic``
    the rows are IOA's ``data/synthetic.parquet`` (caches ``logits/synthetic/``) and the outputs
    ``subdomains-synthetic.parquet`` / ``.json``: the same table (AW per checkpoint for those
    rows), no probe and no checkpoint KL matrix (SCD measures those on the training split).
    """
    from scd_pipeline.engine.logit_cache import SYNTHETIC
    from scd_pipeline.engine.models import load_model
    from scd_pipeline.engine.tokenization import load_tokenizer

    root = task_dir(config)
    split = SYNTHETIC if synthetic else config["cache"]["split"]
    stem = "subdomains-synthetic" if synthetic else "subdomains"
    checkpoints = read_checkpoints(root / "teacher")
    indices = checkpoint_indices(checkpoints)
    best = int(checkpoints["best_index"])
    frame = read_split(root / "data" / f"{split}.parquet")
    student_dir = root / "student_sft"
    if not is_model_dir(student_dir):
        raise ModelError(f"{student_dir}: SFT student not found (run `scd-pipeline sft --role student` first)")
    caches = {index: open_task_cache(config, index, load_tokenizer(student_dir), synthetic) for index in indices}
    model, tokenizer = load_model(student_dir)
    estimate = config["subdomains"].get("estimate", "in_sample")
    heldout = None
    if estimate == "heldout_tag":
        student, teacher_stats, heldout = heldout_tag_stats(config, frame, model, tokenizer, checkpoints, indices)
    else:
        student = _scored_stats(model, tokenizer, frame, config, str(root / "data" / f"{split}.parquet"))
        teacher_stats = {k: cache.stats() for k, cache in caches.items()}
    table = subdomain_table(frame, student, teacher_stats, best)
    summary = {
        "task": config["task"], "split": split, "estimate": estimate, **({"heldout": heldout} if heldout else {}),
        **(summarize_subdomains(table, best) if len(table) else {"best_index": best, "samples": 0}),
        "caches": {str(k): {"path": str(c.path), "uid": c.meta["uid"], "k": c.k} for k, c in caches.items()},
    }
    if not synthetic:
        probe_size = config["subdomains"]["probe_size"]
        probe = probe_sample_ids(frame["sample_id"], probe_size, config["seed"])
        kl = checkpoint_kl_matrix(caches, probe)
        summary.update({
            "probe": {"size": len(probe), "seed": config["seed"],
                      "rule": "random.Random(seed).sample of the split's sorted sample ids (all if fewer), sorted",
                      "sample_ids": probe},
            "kl_definition": CACHE_KL_DEFINITION,
            "kl_best_to_c": {str(b): value for b, value in kl[best].items()},
            "kl_matrix": {"index": indices, "values": [[kl[a][b] for b in indices] for a in indices]},
        })
    table_path = root / f"{stem}.parquet"
    with atomic_path(table_path) as tmp:
        table.to_parquet(tmp, index=False)
    write_json(root / f"{stem}.json", summary)
    write_effective_config(config, root, f"estimate-{stem}")
    return {**summary, "paths": [str(table_path), str(root / f"{stem}.json")]}


def artifacts(config: dict, *, synthetic: bool = False) -> list[Artifact]:
    """What ``estimate-subdomains [--synthetic]`` writes: the per-sample table, its summary, config."""
    root = task_dir(config)
    stem = "subdomains-synthetic" if synthetic else "subdomains"
    return [Artifact(root / f"{stem}.parquet",
                     (root / f"{stem}.parquet", root / f"{stem}.json", root / f"estimate-{stem}.config.yaml"))]
