"""What a distillation reads and writes: its paths, the inputs it refuses to start without, and
what ``estimate-subdomains`` computed for it (SCD's probe, AW's weights)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.config import task_dir
from scd_pipeline.engine.curriculum_files import (
    VAL_SCORES_FILE,
    ioa_dir,
)
from scd_pipeline.engine.io import read_json
from scd_pipeline.engine.logit_cache import CacheUnion, LogitCache, cache_path, open_task_cache
from scd_pipeline.engine.methods import Method
from scd_pipeline.engine.models import is_model_dir
from scd_pipeline.errors import ConfigError, DataError, ModelError

SCHEDULE_FILE = "schedule.json"
CURRICULUM_FILE = "curriculum.json"
SYNTHETIC_FILE = "synthetic.parquet"  # IOA's teacher-written items, under data/
TAID_STATE_FILE = "taid_state.json"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class DistillPaths:
    data: Path          # results/{task}/data
    teacher: Path       # results/{task}/teacher
    init: Path          # results/models/student_base or results/{task}/student_sft
    subdomains: Path    # results/{task}/subdomains.parquet (AW's weights)
    summary: Path       # results/{task}/subdomains.json (SCD's probe and KL(T* || c))
    output: Path        # results/{task}/students/{name}
    state: Path         # results/{task}/.state/distill-{name, '/' as '--'}

    @property
    def synthetic(self) -> Path:
        """IOA's teacher-written items (``scd-pipeline synthesize``)."""
        return self.data / SYNTHETIC_FILE

    @property
    def synthetic_subdomains(self) -> Path:
        """AW's weights of the synthetic items (``estimate-subdomains --synthetic``)."""
        return self.subdomains.with_name("subdomains-synthetic.parquet")

    @property
    def synthetic_summary(self) -> Path:
        return self.subdomains.with_name("subdomains-synthetic.json")


def distill_paths(config: dict, name: str) -> DistillPaths:
    """Where a distillation run named ``name`` reads and writes. ``name`` is a plain folder name or
    several joined by '/' (e.g. ``td/seed-1``); no segment is empty or starts with '.'."""
    segments = name.split("/") if name else []
    if not segments or "\\" in name or any(not part or part.startswith(".") for part in segments):
        raise ConfigError(f"--name {name!r}: must be a folder name or '/'-separated folder names "
                          "(e.g. td/seed-1), none empty or starting with '.'")
    root = task_dir(config)
    init = (Path(config["results_dir"]) / "models" / "student_base" if config["distill"]["init"] == "base"
            else root / "student_sft")
    return DistillPaths(data=root / "data", teacher=root / "teacher", init=init,
                        subdomains=root / "subdomains.parquet", summary=root / "subdomains.json",
                        output=root / "students" / name, state=root / ".state" / f"distill-{name.replace('/', '--')}")


def require_inputs(config: dict, paths: DistillPaths, method: Method, checkpoints: dict, needed: Sequence[int]) -> None:
    """Refuse, before any model is loaded, a missing input, naming the command that makes it
    (a curriculum method also reads IOA's plan; it and a +synthetic control the synthetic items,
    their caches and weights)."""
    if not is_model_dir(paths.init):
        init = config["distill"]["init"]
        command = ("scd-pipeline prepare-model --role student" if init == "base"
                   else "scd-pipeline sft --role student")
        raise ModelError(f"{paths.init}: initial student (distill.init {init}) not found (run `{command}` first)")
    entries = {int(e["index"]): e for e in checkpoints["checkpoints"]}
    for index in needed:
        checkpoint_dir = paths.teacher / entries[index]["path"]
        if not checkpoint_dir.is_dir():
            raise DataError(f"{checkpoint_dir}: teacher checkpoint not found (run `scd-pipeline sft "
                            "--role teacher`, then cache-logits)")
        if not cache_path(paths.data.parent, index).is_file():
            raise DataError(f"{cache_path(paths.data.parent, index)}: teacher-logit cache not found (run "
                            f"`scd-pipeline cache-logits --checkpoint {index}`)")
    needs = []
    if method.needs_subdomains:
        needs += [(path, "estimate-subdomains") for path in (paths.subdomains, paths.summary)]
    if method.curriculum:
        needs += [(ioa_dir(config) / "plan.json", "ioa-plan"), (ioa_dir(config) / VAL_SCORES_FILE, "ioa-plan")]
    if method.uses_synthetic:
        needs += [(paths.synthetic, "synthesize")]
        needs += [(cache_path(paths.data.parent, index, synthetic=True), f"cache-logits --synthetic --checkpoint {index}")
                  for index in needed]
        if method.needs_subdomains:
            needs += [(path, "estimate-subdomains --synthetic")
                      for path in (paths.synthetic_subdomains, paths.synthetic_summary)]
    for path, command in needs:
        if not path.is_file():
            raise DataError(f"{path}: not found; {method.name} reads it (run `scd-pipeline {command}` first)")


def check_cache_covers(cache: LogitCache, frame: pd.DataFrame) -> None:
    """Every training sample is cached with as many completion tokens as it has (else stale)."""
    counts = cache.token_counts(frame["sample_id"].tolist())
    lengths = frame["completion_ids"].map(len).to_numpy()
    if not np.array_equal(counts, lengths):
        bad = int(np.flatnonzero(counts != lengths)[0])
        raise DataError(f"{cache.path}: sample {frame['sample_id'].iat[bad]} has {counts[bad]} cached "
                        f"completion tokens but {lengths[bad]} in the split; re-run `scd-pipeline "
                        f"cache-logits --checkpoint {cache.meta['checkpoint']['index']}`")


def check_cache_width(cache: LogitCache, vocab_size: int) -> None:
    """The cache scores exactly the tokenizer's ids (a cache written from a padded head scores more)."""
    if cache.vocab_size != vocab_size:
        raise DataError(f"{cache.path}: scores {cache.vocab_size} ids but the tokenizer has {vocab_size}; "
                        f"re-run `scd-pipeline cache-logits --checkpoint {cache.meta['checkpoint']['index']}`")


@dataclass
class Subdomains:
    """What distillation reads from ``estimate-subdomains``' artifacts."""

    probe_ids: list[str]
    kl_best_to_c: dict[int, float]
    aw: dict[int, np.ndarray]  # checkpoint -> AW per training row (row order of the split)


def read_subdomains(paths: DistillPaths, frame: pd.DataFrame, caches: Mapping[int, LogitCache],
                    synthetic_caches: Mapping[int, LogitCache] | None = None) -> Subdomains:
    """SCD's probe ids and KL(T* || c), AW per row and checkpoint; refused when they were computed
    from other caches or other data than the ones this run reads. With ``synthetic_caches`` (IOA)
    the synthetic items' weights come from ``subdomains-synthetic.*``."""
    parts = [(paths.summary, paths.subdomains, caches, "estimate-subdomains")]
    if synthetic_caches:
        parts.append((paths.synthetic_summary, paths.synthetic_subdomains, synthetic_caches,
                      "estimate-subdomains --synthetic"))
    tables = []
    for summary_path, table_path, part, command in parts:
        recorded = {int(k): v.get("uid") for k, v in read_json(summary_path).get("caches", {}).items()}
        for index, cache in part.items():
            if recorded.get(index) != cache.meta["uid"]:
                raise DataError(f"{summary_path}: computed from another cache of checkpoint {index} than "
                                f"{cache.path}; re-run `scd-pipeline {command}`")
        tables.append(pd.read_parquet(table_path))
    summary = read_json(paths.summary)
    table = pd.concat(tables, ignore_index=True).set_index("sample_id")
    missing = ~frame["sample_id"].isin(table.index)
    if missing.any():
        raise DataError(f"{paths.subdomains}: no row for sample {frame['sample_id'][missing].iat[0]} of the "
                        "split; re-run `scd-pipeline estimate-subdomains` on the current data")
    rows = table.loc[frame["sample_id"]]
    return Subdomains(probe_ids=list(summary["probe"]["sample_ids"]),
                      kl_best_to_c={int(k): float(v) for k, v in summary["kl_best_to_c"].items()},
                      aw={index: rows[f"aw_ckpt_{index}"].to_numpy(np.float64) for index in caches})


def with_synthetic(config: dict, paths: DistillPaths, train: pd.DataFrame, caches: Mapping[int, LogitCache],
                   tokenizer) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """The training rows plus IOA's synthetic items as one frame, every checkpoint's caches of both
    read as one, and the synthetic items (the curriculum and the +synthetic control)."""
    synthetic = read_split(paths.synthetic)
    frame = pd.concat([train, synthetic[list(train.columns)]], ignore_index=True)
    synthetic_caches = {index: open_task_cache(config, index, tokenizer, synthetic=True) for index in caches}
    return frame, {index: CacheUnion([caches[index], synthetic_caches[index]]) for index in caches}, synthetic
