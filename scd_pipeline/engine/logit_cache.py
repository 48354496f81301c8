"""The teacher-logit cache artifact: its Parquet format, writer and verified reader.

``results/{task}/logits/ckpt-{k}.parquet`` holds, for every sample of the cached split, one teacher
checkpoint's sparse distribution at each completion position (teacher-forced over prompt + gold
completion; the LM head runs only at completion positions, see :mod:`scd_pipeline.engine.batching`):

- per token: the top-k ids (``uint16`` when the vocabulary fits, else ``int32``), their
  log-probabilities at the cache temperature (fp16 by default, fp32, or int8 codes) and the log of
  the mass outside the top k (``tail_logmass``, float32; ``-inf`` when k equals the vocabulary);
- per sample: ``sample_id``, ``n_tokens``, the gold NLL at temperature 1 (``nll_sum``,
  ``nll_mean``) and ``score``, the task metric of the sample (:func:`scoring.sample_score`, the
  same number evaluation reports: letter ranking for choice tasks, exact-match F1 of the greedy
  list for list tasks).

Rows are written in inference order (samples sorted by length), streamed one row group of
``cache.rows_per_group`` samples at a time into a temporary file renamed at the end. The file
carries its own identity in the Parquet key-value metadata (``scd_cache``: format version, k,
dtypes, temperature, vocabulary, checkpoint, dataset fingerprint, a uid); the sidecar
``ckpt-{k}.meta.json`` repeats it with the write's statistics. Training reads targets in random
batch order from ``ckpt-{k}.decoded/``, the top-k lists decoded once into flat memory-mapped arrays
(:func:`decode_cache`; built when the cache is written, rebuilt when missing or stale).
:func:`open_cache` refuses a cache
whose sidecar disagrees with the file, whose column types are not the declared ones, or which does
not serve the dataset, tokenizer, checkpoint or temperature it is asked for — before any work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scd_pipeline.engine.checkpoints import checkpoint_entry, read_checkpoints
from scd_pipeline.engine.config import task_dir
from scd_pipeline.engine.io import read_json, sha256_file, write_json
from scd_pipeline.engine.scoring import AUTO, SAMPLE_METRIC, ScoredBatch, score_batches
from scd_pipeline.engine.tokenization import tokenizer_fingerprint
from scd_pipeline.errors import ConfigError, DataError, ModelError
from scd_pipeline.math.losses import SparseTarget, vocabulary_logits

CACHE_FORMAT = "scd-teacher-logits"
FORMAT_VERSION = 3               # 3: per-sample score (the task metric) replaces the argmax "correct"
PARQUET_META_KEY = b"scd_cache"  # the sidecar's identity fields, also inside the Parquet footer
LOGPROB_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int8": np.uint8}
# int8: a top-k log-prob is stored as the code round(-logprob / LOGPROB_STEP) in 0..255 (uint8) and
# read back as -code * LOGPROB_STEP; values below -25.5 nats (p < 1e-11) clamp to code 255. The
# 0.05-nat rounding is far below the top-k truncation error (benchmarks/RESULTS.md §1), and the
# losses renormalise the cached buckets, so the rounding never adds up to mass that is not there.
LOGPROB_STEP = 0.1
# Measured on SmolLM2 demo caches (k=50, fp16): plain zstd 148 B/token; dictionary-encoded ids
# (top-k ids repeat across tokens; a dictionary holds at most the vocabulary) and byte-stream-split
# log-probs at zstd level 6: 125 B/token, still ~70k tokens/s to write on one CPU core.
PARQUET_OPTIONS = {
    "compression": "zstd", "compression_level": 6, "write_page_checksum": True,
    "use_dictionary": ["sample_id", "topk_ids.list.element.list.element"],
    "column_encoding": {"topk_logprobs.list.element.list.element": "BYTE_STREAM_SPLIT"},
}
# Identity fields the Parquet footer and the sidecar must agree on (issue: a hand-edited sidecar).
IDENTITY_FIELDS = ("format", "format_version", "uid", "k", "dtype", "id_dtype", "temperature", "vocab_size",
                   "task", "split", "dataset_fingerprint", "tokenizer", "checkpoint")


# --------------------------------------------------------------------------- paths and identities


SYNTHETIC = "synthetic"  # IOA's teacher-written items (data/synthetic.parquet), cached beside the split's


def cache_path(task_path: str | Path, checkpoint: int, synthetic: bool = False) -> Path:
    """``{task_dir}/logits/ckpt-{k}.parquet`` (the split ``cache.split``), or, for IOA's synthetic
    items, ``{task_dir}/logits/synthetic/ckpt-{k}.parquet``."""
    folder = Path(task_path) / "logits"
    return (folder / SYNTHETIC if synthetic else folder) / f"ckpt-{checkpoint}.parquet"


def sidecar_path(parquet: str | Path) -> Path:
    """``ckpt-{k}.parquet`` -> ``ckpt-{k}.meta.json`` beside it."""
    parquet = Path(parquet)
    return parquet.with_name(parquet.name.removesuffix(".parquet") + ".meta.json")


def encode_logprobs(logprobs: np.ndarray, dtype: str) -> np.ndarray:
    """Top-k log-probs (fp32) as stored under ``cache.dtype`` (fp16, fp32, or int8 codes)."""
    if dtype == "int8":
        codes = np.nan_to_num(-np.asarray(logprobs, np.float32) / LOGPROB_STEP, nan=255.0, posinf=255.0)
        return np.clip(np.rint(codes), 0, 255).astype(np.uint8)
    return np.asarray(logprobs).astype(LOGPROB_DTYPES[dtype])


def decode_logprobs(stored: np.ndarray, meta: dict) -> np.ndarray:
    """Stored top-k log-probs back to fp32 log-probs, by the cache's sidecar ``dtype``."""
    if meta.get("dtype") == "int8":
        return stored.astype(np.float32) * -float(meta.get("logprob_step", LOGPROB_STEP))
    return stored.astype(np.float32)


def id_dtype_for(vocab_size: int) -> np.dtype:
    """Smallest integer type that holds every token id: uint16 up to 65,536 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _weight_files(checkpoint_dir: Path) -> list[Path]:
    files = sorted(p for p in checkpoint_dir.iterdir()
                   if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ModelError(f"checkpoint {checkpoint_dir}: no *.safetensors or *.bin weight files")
    return files


def checkpoint_identity(checkpoint_dir: str | Path, index: int) -> dict:
    """Index, path and the weight files' names, sizes, mtimes and sha256 (the content identity)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = [{"name": p.name, "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns,
              "sha256": sha256_file(p)} for p in _weight_files(checkpoint_dir)]
    return {"index": index, "path": str(checkpoint_dir.resolve()), "weights": files,
            "sha256": hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()}


def checkpoint_mismatch(recorded: dict, checkpoint_dir: str | Path) -> str | None:
    """Why the weights in ``checkpoint_dir`` are not the ones ``recorded``; None when they are.

    Same names, sizes and mtimes are accepted without hashing (fast); otherwise the sha256 decides
    (a copied checkpoint passes, a retrained one does not).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return f"checkpoint directory {checkpoint_dir} not found"
    current = _weight_files(checkpoint_dir)
    expected = {f["name"]: f for f in recorded["weights"]}
    if sorted(p.name for p in current) != sorted(expected):
        return f"weight files {sorted(p.name for p in current)} vs recorded {sorted(expected)}"
    for path in current:
        record, stat = expected[path.name], path.stat()
        if stat.st_size != record["bytes"]:
            return f"{path.name} has {stat.st_size} bytes, cache was built from {record['bytes']}"
        if stat.st_mtime_ns != record["mtime_ns"] and sha256_file(path) != record["sha256"]:
            return f"{path.name} content differs (sha256) from the weights the cache was built from"
    return None


def dataset_fingerprint_for(data_dir: str | Path, split: str) -> tuple[str, str]:
    """``(fingerprint, source)``: the data manifest's ``dataset_fingerprint`` when present
    (source ``manifest``), else the sha256 of ``{split}.parquet`` (source ``split_sha256``).

    IOA's ``synthetic`` items are written after the manifest: their fingerprint is the sha256 of
    the manifest's fingerprint and the file's sha256 (source ``manifest+synthetic_sha256``).
    """
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.json"
    if split == SYNTHETIC:
        split_file = data_dir / f"{SYNTHETIC}.parquet"
        if not split_file.is_file():
            raise DataError(f"{split_file}: synthetic items not found (run `scd-pipeline synthesize` first)")
        base, _ = dataset_fingerprint_for(data_dir, "train")
        return hashlib.sha256(f"{base} {sha256_file(split_file)}".encode()).hexdigest(), "manifest+synthetic_sha256"
    if manifest.is_file():
        value = read_json(manifest).get("dataset_fingerprint")
        if value:
            return str(value), "manifest"
    split_file = data_dir / f"{split}.parquet"
    if not split_file.is_file():
        raise DataError(f"{split_file}: split not found (run `scd-pipeline prepare-data` first)")
    return sha256_file(split_file), "split_sha256"


def cache_schema(vocab_size: int, dtype: str):
    """Arrow schema of a cache file (list columns: one entry per completion token)."""
    import pyarrow as pa

    ids = pa.from_numpy_dtype(id_dtype_for(vocab_size))
    logprob = pa.from_numpy_dtype(np.dtype(LOGPROB_DTYPES[dtype]))
    return pa.schema([
        ("sample_id", pa.string()), ("n_tokens", pa.int32()), ("nll_sum", pa.float32()),
        ("nll_mean", pa.float32()), ("score", pa.float32()),
        ("topk_ids", pa.list_(pa.list_(ids))), ("topk_logprobs", pa.list_(pa.list_(logprob))),
        ("tail_logmass", pa.list_(pa.float32())),
    ])


@dataclass
class _CachedSample:
    sample_id: str
    nll_sum: float
    score: float
    ids: np.ndarray        # (n, k)
    logprobs: np.ndarray   # (n, k)
    tail: np.ndarray       # (n,)


def _nested(offsets: np.ndarray, flat: np.ndarray, k: int):
    import pyarrow as pa

    inner_offsets = np.arange(0, flat.size + 1, k, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat)))


def _group_table(samples: Sequence[_CachedSample], schema, k: int):
    """One row group of samples as an Arrow table with ``schema``."""
    import pyarrow as pa

    n_tokens = np.array([len(s.tail) for s in samples], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(n_tokens)]).astype(np.int32)
    nll_sum = np.array([s.nll_sum for s in samples], dtype=np.float32)
    return pa.Table.from_arrays([
        pa.array([s.sample_id for s in samples], pa.string()),
        pa.array(n_tokens), pa.array(nll_sum), pa.array(nll_sum / n_tokens),
        pa.array(np.array([s.score for s in samples], dtype=np.float32)),
        _nested(offsets, np.concatenate([s.ids for s in samples]).reshape(-1), k),
        _nested(offsets, np.concatenate([s.logprobs for s in samples]).reshape(-1), k),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate([s.tail for s in samples]))),
    ], schema=schema)


def _split_samples(scored: ScoredBatch, sample_ids: np.ndarray, ids: np.ndarray, logprobs: np.ndarray,
                   tail: np.ndarray) -> list[_CachedSample]:
    counts = scored.n_tokens.cpu().numpy()
    bounds = np.concatenate([[0], np.cumsum(counts)])
    nll = (-scored.gold_logprob).float().cpu().numpy()
    return [_CachedSample(str(sample_ids[row]), float(nll[j]), float(scored.scores[j]),
                          ids[bounds[j]:bounds[j + 1]], logprobs[bounds[j]:bounds[j + 1]],
                          tail[bounds[j]:bounds[j + 1]])
            for j, row in enumerate(scored.batch.index)]


def write_logit_cache(model, tokenizer, frame: pd.DataFrame, out_path: str | Path, identity: dict, *,
                      top_k: int, dtype: str = "fp16", temperature: float = 1.0, batch_size: int = 16,
                      rows_per_group: int = 256, max_new_tokens: int | str = AUTO) -> dict:
    """Stream ``model``'s sparse completion distributions over ``frame`` into ``out_path``, with
    each sample's gold NLL and task score from the same scoring pass as evaluation.

    ``identity`` (tokenizer, dataset, checkpoint, split...) goes into the sidecar and the Parquet
    footer. At most one row group is held in memory. An older cache under these names is removed
    first and the new file appears under its final name only when complete, so a crash leaves
    nothing there; the sidecar is written last, then the decoded copy the readers map. Returns the
    sidecar record (with ``tokens_per_second`` of the capture).
    """
    import pyarrow.parquet as pq

    from scd_pipeline.engine.io import atomic_path

    out_path = Path(out_path)
    vocab_size = len(tokenizer)  # the ids every model of this tokenizer scores; a head may be wider
    head = int(model.get_output_embeddings().weight.shape[0])
    if head < vocab_size:
        raise ModelError(f"{out_path}: the model's head scores {head} ids but its tokenizer has {vocab_size}; "
                         "cache a checkpoint saved with its own tokenizer")
    if not 1 <= top_k <= vocab_size:
        raise ConfigError(f"config key cache.top_k: {top_k} must be between 1 and the vocabulary size {vocab_size}")
    if dtype not in LOGPROB_DTYPES:
        raise ConfigError(f"config key cache.dtype: {dtype!r} is not one of {sorted(LOGPROB_DTYPES)}")
    id_dtype = id_dtype_for(vocab_size)
    meta = {"format": CACHE_FORMAT, "format_version": FORMAT_VERSION, "uid": uuid.uuid4().hex,
            "k": top_k, "dtype": dtype, **({"logprob_step": LOGPROB_STEP} if dtype == "int8" else {}),
            "id_dtype": id_dtype.name, "temperature": float(temperature),
            "vocab_size": vocab_size, **identity, "score_rule": SAMPLE_METRIC,
            "nll": "gold NLL at temperature 1 over the completion tokens (nll_mean = nll_sum / n_tokens)",
            "row_order": "inference order (samples sorted by length); look samples up by sample_id",
            "rows_per_group": rows_per_group}
    schema = cache_schema(vocab_size, dtype).with_metadata({PARQUET_META_KEY: json.dumps(meta)})
    sidecar = sidecar_path(out_path)
    # A previous cache under these names is stale from here on: a crash must leave no file there.
    sidecar.unlink(missing_ok=True)
    out_path.unlink(missing_ok=True)
    shutil.rmtree(decoded_dir(out_path), ignore_errors=True)
    sample_ids = frame["sample_id"].to_numpy()
    pending: list[_CachedSample] = []
    rows = tokens = 0
    started = time.perf_counter()
    with atomic_path(out_path) as tmp:
        with pq.ParquetWriter(tmp, schema, **PARQUET_OPTIONS) as writer:
            for scored in score_batches(model, tokenizer, frame, batch_size, max_new_tokens, where=str(out_path)):
                target = SparseTarget.from_logits(vocabulary_logits(scored.logits, vocab_size), top_k, temperature)
                pending += _split_samples(scored, sample_ids, target.ids.cpu().numpy().astype(id_dtype),
                                          encode_logprobs(target.logprobs.cpu().numpy(), dtype),
                                          target.tail_logmass.cpu().numpy().astype(np.float32))
                while len(pending) >= rows_per_group:
                    writer.write_table(_group_table(pending[:rows_per_group], schema, top_k))
                    del pending[:rows_per_group]
                rows += scored.batch.num_samples
                tokens += int(scored.n_tokens.sum())
            if pending:
                writer.write_table(_group_table(pending, schema, top_k))
        seconds = time.perf_counter() - started
        file_bytes = tmp.stat().st_size
    meta.update({"rows": rows, "tokens": tokens, "file_bytes": file_bytes,
                 "bytes_per_token": file_bytes / max(tokens, 1),
                 "capture_seconds": round(seconds, 3), "tokens_per_second": tokens / max(seconds, 1e-9),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_json(sidecar, meta)
    decode_cache(out_path, meta, pq.ParquetFile(out_path))  # once here, not by each training process
    return meta


# --------------------------------------------------------------------------- reading


DECODED_FILES = ("ids", "logprobs", "tail", "token_start")


def decoded_dir(parquet: str | Path) -> Path:
    """``ckpt-{k}.parquet`` -> ``ckpt-{k}.decoded/`` beside it: the cache's top-k lists decoded
    once into flat arrays that readers memory-map."""
    parquet = Path(parquet)
    return parquet.with_name(parquet.name.removesuffix(".parquet") + ".decoded")


def _corrupt(path: Path, exc: Exception) -> DataError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return DataError(f"{path}: truncated or corrupt Parquet cache ({exc.__class__.__name__}: {detail}); "
                     "delete it and re-run `scd-pipeline cache-logits`")


def _load_decoded(folder: Path, meta: dict) -> dict[str, np.ndarray] | None:
    """The memory-mapped arrays of ``folder`` if they are this cache's (same write ``uid``, whole),
    else None."""
    try:
        if read_json(folder / "identity.json") != {"uid": meta["uid"], "rows": meta["rows"], "tokens": meta["tokens"]}:
            return None
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in DECODED_FILES}
    except (OSError, ValueError, KeyError):
        return None
    tokens, k = int(meta["tokens"]), int(meta["k"])
    shapes = {"ids": (tokens, k), "logprobs": (tokens, k), "tail": (tokens,), "token_start": (int(meta["rows"]) + 1,)}
    return arrays if all(arrays[n].shape == shapes[n] for n in DECODED_FILES) else None


def decode_cache(path: Path, meta: dict, parquet_file) -> dict[str, np.ndarray]:
    """The cache's decoded arrays, memory-mapped: ``ids`` (tokens, k), ``logprobs`` (tokens, k, as
    stored: fp16, fp32 or int8 codes), ``tail`` (tokens,) and ``token_start`` (rows + 1: each file
    row's first token). Built on first use by one sequential pass over the row groups (each group
    decompressed once), beside the Parquet file; later opens — every process of a run, every
    checkpoint SCD reads — map the same pages, so a random-order batch reads exactly its samples'
    tokens and the operating system shares them between processes. A folder of another write
    (``uid``) or a torn one is rebuilt; two processes building at once both finish, one copy stays.
    """
    import pyarrow.compute as pc

    folder = decoded_dir(path)
    found = _load_decoded(folder, meta)
    if found is not None:
        return found
    tokens, k = int(meta["tokens"]), int(meta["k"])
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir(parents=True)
    try:
        stored = np.dtype(np.uint8) if meta["dtype"] == "int8" else np.dtype(LOGPROB_DTYPES[meta["dtype"]])
        out = {"ids": np.lib.format.open_memmap(staging / "ids.npy", "w+", np.dtype(meta["id_dtype"]), (tokens, k)),
               "logprobs": np.lib.format.open_memmap(staging / "logprobs.npy", "w+", stored, (tokens, k)),
               "tail": np.lib.format.open_memmap(staging / "tail.npy", "w+", np.float32, (tokens,))}
        starts = [np.zeros(1, np.int64)]
        at = 0
        for group in range(parquet_file.num_row_groups):
            try:
                table = parquet_file.read_row_group(group, columns=["n_tokens", "topk_ids", "topk_logprobs",
                                                                    "tail_logmass"])
                counts = table.column("n_tokens").to_numpy()
                ids = pc.list_flatten(pc.list_flatten(table.column("topk_ids"))).to_numpy()
                logprobs = pc.list_flatten(pc.list_flatten(table.column("topk_logprobs"))).to_numpy()
                tail = pc.list_flatten(table.column("tail_logmass")).to_numpy()
            except Exception as exc:
                raise _corrupt(path, exc) from exc
            n = int(counts.sum())
            if tail.size != n or ids.size != n * k or logprobs.size != ids.size or at + n > tokens:
                raise DataError(f"{path}: row group {group} has inconsistent token lists; re-run cache-logits")
            out["ids"][at:at + n] = ids.reshape(n, k)
            out["logprobs"][at:at + n] = logprobs.reshape(n, k)
            out["tail"][at:at + n] = tail
            starts.append(at + np.cumsum(counts, dtype=np.int64))
            at += n
        if at != tokens:
            raise DataError(f"{path}: {at} tokens in the file, {tokens} in its sidecar; re-run cache-logits")
        for array in out.values():
            array.flush()
        del out
        np.save(staging / "token_start.npy", np.concatenate(starts))
        write_json(staging / "identity.json", {"uid": meta["uid"], "rows": meta["rows"], "tokens": tokens})
        shutil.rmtree(folder, ignore_errors=True)  # another write's copy
        try:
            os.rename(staging, folder)
        except OSError:  # another process put its copy there first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    found = _load_decoded(folder, meta)
    if found is None:
        raise DataError(f"{folder}: the decoded copy of {path.name} could not be written; check the disk and "
                        "delete the folder")
    return found


class LogitCache:
    """An opened, verified cache file: per-sample scores and sparse targets by sample id.

    Targets are read from the cache's decoded copy (:func:`decode_cache`, memory-mapped): a batch
    costs the copy of its own tokens' top-k lists, in whatever order batches come.
    """

    def __init__(self, path: Path, meta: dict, parquet_file) -> None:
        self.path = path
        self.meta = meta
        try:
            head = parquet_file.read(columns=["sample_id", "n_tokens", "nll_sum", "nll_mean", "score"])
        except Exception as exc:
            raise _corrupt(path, exc) from exc
        self._stats = head.to_pandas()
        self._row_of = pd.Index(self._stats["sample_id"])
        if not self._row_of.is_unique:
            raise DataError(f"{path}: sample_id repeats; the cache is corrupt, re-run cache-logits")
        self._arrays = decode_cache(path, meta, parquet_file)
        if not np.array_equal(np.diff(self._arrays["token_start"]), self._stats["n_tokens"].to_numpy()):
            raise DataError(f"{decoded_dir(path)}: its token counts are not the cache's; delete it (it is rebuilt)")

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def sample_ids(self) -> list[str]:
        return self._stats["sample_id"].tolist()

    def stats(self) -> pd.DataFrame:
        """Per-sample ``sample_id, n_tokens, nll_sum, nll_mean, score`` (file order)."""
        return self._stats.copy()

    def _rows(self, sample_ids: Sequence[str]) -> np.ndarray:
        rows = self._row_of.get_indexer(list(sample_ids))
        if (rows < 0).any():
            missing = [s for s, r in zip(sample_ids, rows, strict=True) if r < 0][:3]
            raise DataError(f"{self.path}: sample(s) {missing} are not in the cache (split "
                            f"{self.meta.get('split')!r}); the cache was built from other data")
        return rows

    def token_counts(self, sample_ids: Sequence[str]) -> np.ndarray:
        """Completion tokens per requested sample."""
        return self._stats["n_tokens"].to_numpy()[self._rows(sample_ids)]

    def targets(self, sample_ids: Sequence[str], completion_lengths: Sequence[int] | None = None,
                device: torch.device | str | None = None) -> SparseTarget:
        """Sparse teacher targets for ``sample_ids``, sample by sample and token by token: the
        row-major order of ``batching.collate``'s ``predict_mask`` for a batch of these samples.

        ``completion_lengths`` (the student batch's token counts) are checked against the cache.
        """
        rows = self._rows(sample_ids)
        counts = self._stats["n_tokens"].to_numpy()[rows]
        if completion_lengths is not None and not np.array_equal(counts, np.asarray(completion_lengths)):
            bad = int(np.flatnonzero(counts != np.asarray(completion_lengths))[0])
            raise DataError(f"{self.path}: sample {sample_ids[bad]} has {counts[bad]} cached completion "
                            f"tokens but the batch has {completion_lengths[bad]}; the cache is stale")
        starts = self._arrays["token_start"]
        spans = [slice(int(starts[row]), int(starts[row + 1])) for row in rows]
        ids = np.concatenate([self._arrays["ids"][span] for span in spans]) if spans else np.zeros((0, self.k))
        stored = np.concatenate([self._arrays["logprobs"][span] for span in spans]) if spans else np.zeros((0, self.k))
        tails = np.concatenate([self._arrays["tail"][span] for span in spans]) if spans else np.zeros(0)
        return SparseTarget(
            ids=torch.from_numpy(ids.astype(np.int64)).to(device),
            logprobs=torch.from_numpy(decode_logprobs(stored, self.meta)).to(device),
            tail_logmass=torch.from_numpy(tails.astype(np.float32)).to(device),
            vocab_size=self.vocab_size, temperature=float(self.meta["temperature"]))


class CacheUnion:
    """Several verified caches of one checkpoint read as one (IOA: the training split's and the
    synthetic items'): targets, token counts and per-sample stats by sample id, from whichever
    file holds the sample. The caches must agree on k, vocabulary and temperature."""

    def __init__(self, caches: Sequence[LogitCache]) -> None:
        first = caches[0]
        for cache in caches[1:]:
            for field_name in ("k", "vocab_size", "temperature"):
                if cache.meta[field_name] != first.meta[field_name]:
                    raise _refuse(cache.path, field_name, cache.meta[field_name], first.meta[field_name])
        self.caches = list(caches)
        self.path = first.path
        self.meta = {**first.meta, "uid": "+".join(c.meta["uid"] for c in caches)}
        self._owner = pd.Series(np.concatenate([np.full(len(c.sample_ids), i) for i, c in enumerate(caches)]),
                                index=pd.Index([s for c in caches for s in c.sample_ids]))
        if not self._owner.index.is_unique:
            raise DataError(f"{first.path}: a sample id occurs in more than one of the caches "
                            f"{[str(c.path) for c in caches]}; re-run synthesize and cache-logits")

    @property
    def k(self) -> int:
        return self.caches[0].k

    @property
    def vocab_size(self) -> int:
        return self.caches[0].vocab_size

    @property
    def sample_ids(self) -> list[str]:
        return [s for c in self.caches for s in c.sample_ids]

    def stats(self) -> pd.DataFrame:
        return pd.concat([c.stats() for c in self.caches], ignore_index=True)

    def _owners(self, sample_ids: Sequence[str]) -> np.ndarray:
        owners = self._owner.reindex(list(sample_ids))
        if owners.isna().any():
            self.caches[0]._rows([s for s, o in zip(sample_ids, owners, strict=True) if pd.isna(o)])
        return owners.to_numpy(dtype=np.int64)

    def token_counts(self, sample_ids: Sequence[str]) -> np.ndarray:
        owners, counts = self._owners(sample_ids), np.zeros(len(sample_ids), dtype=np.int64)
        for i, cache in enumerate(self.caches):
            mask = owners == i
            if mask.any():
                counts[mask] = cache.token_counts([s for s, m in zip(sample_ids, mask, strict=True) if m])
        return counts

    def targets(self, sample_ids: Sequence[str], completion_lengths: Sequence[int] | None = None,
                device: torch.device | str | None = None) -> SparseTarget:
        """As :meth:`LogitCache.targets`: runs of samples from one file are read together and the
        pieces joined in the requested order."""
        owners = self._owners(sample_ids)
        lengths = list(completion_lengths) if completion_lengths is not None else None
        pieces, start = [], 0
        while start < len(sample_ids):
            end = start
            while end < len(sample_ids) and owners[end] == owners[start]:
                end += 1
            pieces.append(self.caches[owners[start]].targets(
                list(sample_ids[start:end]), lengths[start:end] if lengths is not None else None, device))
            start = end
        if len(pieces) == 1:
            return pieces[0]
        return SparseTarget(ids=torch.cat([p.ids for p in pieces]), logprobs=torch.cat([p.logprobs for p in pieces]),
                            tail_logmass=torch.cat([p.tail_logmass for p in pieces]),
                            vocab_size=pieces[0].vocab_size, temperature=pieces[0].temperature)


def _read_sidecar(path: Path) -> dict:
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise DataError(f"{path}: sidecar {sidecar.name} is missing (interrupted or foreign cache); "
                        "re-run `scd-pipeline cache-logits`")
    try:
        meta = read_json(sidecar)
    except (ValueError, OSError) as exc:
        raise DataError(f"{sidecar}: not valid JSON ({exc.__class__.__name__}); re-run cache-logits") from exc
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise DataError(f"{sidecar}: not a {CACHE_FORMAT} sidecar; re-run cache-logits")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{sidecar}: cache format version {version!r} is not the one this scd-pipeline "
                        f"reads ({FORMAT_VERSION}); re-run `scd-pipeline cache-logits` with this version")
    if meta.get("dtype") not in LOGPROB_DTYPES:
        raise DataError(f"{sidecar}: log-prob dtype {meta.get('dtype')!r} is not one of "
                        f"{sorted(LOGPROB_DTYPES)}; re-run cache-logits")
    return meta


def _refuse(path: Path, field: str, cached: Any, expected: Any) -> DataError:
    return DataError(f"{path}: {field} does not match (cache: {cached}, expected: {expected}); "
                     "re-run `scd-pipeline cache-logits` for this checkpoint")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_file_identity(path: Path, meta: dict, parquet_file) -> dict:
    """The file's own identity (Parquet footer) against the sidecar, field by field, and the
    column types against the declared dtypes; returns the footer. One-line DataError naming the
    first field that differs: the sidecar was edited or belongs to another write."""
    import pyarrow as pa

    try:
        footer = json.loads(parquet_file.schema_arrow.metadata[PARQUET_META_KEY])
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    for field in IDENTITY_FIELDS:
        if footer.get(field) != meta.get(field):
            raise DataError(f"{path}: sidecar {sidecar_path(path).name} says {field} = {_short(meta.get(field))} "
                            f"but the file says {_short(footer.get(field))} (edited, or the sidecar of "
                            "another write); re-run `scd-pipeline cache-logits` for this checkpoint")
    schema = parquet_file.schema_arrow
    expected = {"topk_ids": pa.list_(pa.list_(pa.from_numpy_dtype(np.dtype(footer["id_dtype"])))),
                "topk_logprobs": pa.list_(pa.list_(pa.from_numpy_dtype(np.dtype(LOGPROB_DTYPES[footer["dtype"]])))),
                "score": pa.float32()}
    for column, arrow_type in expected.items():
        index = schema.get_field_index(column)
        actual = schema.field(index).type if index >= 0 else None
        if actual is None or not actual.equals(arrow_type):
            raise DataError(f"{path}: column {column} is {actual}, not the {arrow_type} its metadata declares; "
                            "the file is not a cache this scd-pipeline wrote, re-run `scd-pipeline cache-logits`")
    return footer


def open_cache(path: str | Path, *, dataset_fingerprint: str | None = None, split: str | None = None,
               tokenizer: dict | None = None, checkpoint_dir: str | Path | None = None,
               checkpoint_index: int | None = None, temperature: float | None = None) -> LogitCache:
    """Open a cache after checking it is whole and serves what the caller expects.

    Every expectation left as None is not checked. ``tokenizer`` is a
    :func:`~scd_pipeline.engine.tokenization.tokenizer_fingerprint`. Refusals are one-line DataErrors
    naming the file and the field: missing sidecar, truncated/corrupt Parquet, a sidecar that
    disagrees with the file's own identity (edited, or of another write), column types other than
    the declared ones, other dataset, split, tokenizer, checkpoint (weights hash) or temperature.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: cache not found (run `scd-pipeline cache-logits --checkpoint K`)")
    meta = _read_sidecar(path)
    try:
        parquet_file = pq.ParquetFile(path, page_checksum_verification=True)
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    check_file_identity(path, meta, parquet_file)
    if path.stat().st_size != meta.get("file_bytes") or parquet_file.metadata.num_rows != meta.get("rows"):
        raise _refuse(path, "file size/rows", (path.stat().st_size, parquet_file.metadata.num_rows),
                      (meta.get("file_bytes"), meta.get("rows")))
    if dataset_fingerprint is not None and meta.get("dataset_fingerprint") != dataset_fingerprint:
        raise _refuse(path, "dataset_fingerprint", str(meta.get("dataset_fingerprint"))[:12], dataset_fingerprint[:12])
    if split is not None and meta.get("split") != split:
        raise _refuse(path, "split", meta.get("split"), split)
    if tokenizer is not None and meta.get("tokenizer") != tokenizer:
        cached = meta.get("tokenizer") or {}
        raise _refuse(path, "tokenizer fingerprint", f"{cached.get('vocab_size')}/{str(cached.get('sha256'))[:12]}",
                      f"{tokenizer['vocab_size']}/{tokenizer['sha256'][:12]}")
    recorded = meta.get("checkpoint") or {}
    if checkpoint_index is not None and recorded.get("index") != checkpoint_index:
        raise _refuse(path, "checkpoint index", recorded.get("index"), checkpoint_index)
    if checkpoint_dir is not None:
        reason = (checkpoint_mismatch(recorded, checkpoint_dir) if "weights" in recorded
                  else "the sidecar records no checkpoint weights")
        if reason:
            raise DataError(f"{path}: checkpoint does not match ({reason}); re-run "
                            f"`scd-pipeline cache-logits --checkpoint {recorded.get('index', 'K')}`")
    if temperature is not None and float(meta.get("temperature", -1)) != float(temperature):
        raise _refuse(path, "temperature", meta.get("temperature"), temperature)
    return LogitCache(path, meta, parquet_file)


def open_task_cache(config: dict, checkpoint: int, tokenizer=None, synthetic: bool = False) -> LogitCache:
    """Open ``logits/ckpt-{k}.parquet`` (or IOA's ``logits/synthetic/ckpt-{k}.parquet``) of the
    configured task, checked against the current data split (``cache.split``, or
    ``data/synthetic.parquet``), teacher checkpoint ``k`` (weights), ``cache.temperature`` and,
    when given, the caller's tokenizer (e.g. the student's)."""
    root = task_dir(config)
    split = SYNTHETIC if synthetic else config["cache"]["split"]
    teacher_dir = root / "teacher"
    entry = checkpoint_entry(read_checkpoints(teacher_dir), checkpoint)
    fingerprint, _ = dataset_fingerprint_for(root / "data", split)
    return open_cache(cache_path(root, checkpoint, synthetic), dataset_fingerprint=fingerprint, split=split,
                      tokenizer=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
                      checkpoint_dir=teacher_dir / entry["path"], checkpoint_index=checkpoint,
                      temperature=config["cache"]["temperature"])


def cache_info(path: str | Path) -> dict:
    """Rows, tokens, k, dtype, file size, bytes/token, row groups and the sidecar of a cache file.

    Inspection only: k, dtypes and temperature come from the file itself (its Parquet metadata);
    a missing sidecar is reported (``sidecar: null``), and ``sidecar_mismatch`` names the identity
    fields where an existing sidecar disagrees with the file (such a cache is refused by readers).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: cache not found")
    try:
        parquet_file = pq.ParquetFile(path)
        footer = json.loads((parquet_file.schema_arrow.metadata or {}).get(PARQUET_META_KEY, b"{}"))
        tokens = int(parquet_file.read(columns=["n_tokens"]).column("n_tokens").to_numpy().sum())
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    sidecar = sidecar_path(path)
    try:
        meta = read_json(sidecar) if sidecar.is_file() else None
    except ValueError as exc:
        raise DataError(f"{sidecar}: not valid JSON ({exc.__class__.__name__}); re-run cache-logits") from exc
    size = path.stat().st_size
    mismatch = ([field for field in IDENTITY_FIELDS if footer.get(field) != meta.get(field)]
                if isinstance(meta, dict) else [])
    return {"path": str(path), "rows": parquet_file.metadata.num_rows, "tokens": tokens,
            "k": footer.get("k"), "dtype": footer.get("dtype"), "id_dtype": footer.get("id_dtype"),
            "temperature": footer.get("temperature"), "format_version": footer.get("format_version"),
            "file_bytes": size, "bytes_per_token": size / max(tokens, 1),
            "row_groups": parquet_file.num_row_groups, "sidecar": meta, "sidecar_mismatch": mismatch}
