"""Cache reads at the paper's scale: random-order training batches from a length-sorted cache.

A synthetic cache of ``--rows`` samples (completion lengths uniform in 50..300 tokens, the
workload of the paper's tasks), ``--vocab`` ids (int32 ids above 65,536), top ``--k`` fp16
log-probs, ``cache.rows_per_group`` 256, written with the project's own schema and Parquet options
(random ids: a worst case for compression). Micro-batches of ``--batch`` samples come from
``training.training_plan`` (length-grouped, shuffled: what the loop reads), ``--micro-batches`` of
them, the same ones for both readers:

* ``row-group LRU``: the reader before the decoded copy (kept here for the comparison): a batch
  decodes each Parquet row group it touches, the last 16 decoded groups are kept;
* ``decoded copy``: ``LogitCache.targets`` over the memory-mapped arrays ``decode_cache`` writes
  once (its one-time cost is reported apart).

Per micro-batch: CPU seconds, bytes decoded or copied over the bytes the batch needs (read
amplification), and the process's resident memory that is not file pages after all batches (a
memory-mapped file's pages are shared between processes and dropped by the OS under pressure).

    .venv/bin/python benchmarks/bench_cache_reads.py                       # 20,000 rows, V 128,256, k 128
    .venv/bin/python benchmarks/bench_cache_reads.py --rows 2000 --micro-batches 50   # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import _common  # noqa: F401  (pins torch to one thread before anything imports it)
import numpy as np
import psutil
from _common import format_table, machine_line

from scd_pipeline.engine import logit_cache
from scd_pipeline.engine.io import write_json
from scd_pipeline.engine.training import training_plan


def write_synthetic_cache(path: Path, rows: int, vocab: int, k: int, seed: int) -> dict:
    """A cache file + sidecar that ``open_cache`` accepts, rows sorted by length like a real one."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(50, 301, size=rows))
    id_dtype = logit_cache.id_dtype_for(vocab)
    meta = {"format": logit_cache.CACHE_FORMAT, "format_version": logit_cache.FORMAT_VERSION,
            "uid": uuid.uuid4().hex, "k": k, "dtype": "fp16", "id_dtype": id_dtype.name, "temperature": 1.0,
            "vocab_size": vocab, "task": "synthetic", "split": "train", "dataset_fingerprint": "synthetic",
            "tokenizer": {"vocab_size": vocab, "sha256": "synthetic"}, "checkpoint": {"index": 1}}
    schema = logit_cache.cache_schema(vocab, "fp16").with_metadata({logit_cache.PARQUET_META_KEY: json.dumps(meta)})
    per_group = 256
    with pq.ParquetWriter(path, schema, **logit_cache.PARQUET_OPTIONS) as writer:
        for start in range(0, rows, per_group):
            samples = []
            for row in range(start, min(start + per_group, rows)):
                n = int(lengths[row])
                logprobs = -np.sort(rng.exponential(2.0, size=(n, k)).astype(np.float32), axis=1)
                samples.append(logit_cache._CachedSample(
                    f"s{row:06d}", float(n), 1.0, rng.integers(0, vocab, size=(n, k)).astype(id_dtype),
                    logprobs.astype(np.float16), np.full(n, -3.0, np.float32)))
            writer.write_table(logit_cache._group_table(samples, schema, k))
    meta.update({"rows": rows, "tokens": int(lengths.sum()), "file_bytes": path.stat().st_size})
    write_json(logit_cache.sidecar_path(path), meta)
    return meta


class RowGroupLRU:
    """The earlier reader: decode a whole row group per miss, keep the last ``max_groups``."""

    def __init__(self, path: Path, meta: dict, max_groups: int = 16) -> None:
        import pyarrow.parquet as pq

        self.file, self.meta, self.k, self.max_groups = pq.ParquetFile(path), meta, int(meta["k"]), max_groups
        stats = self.file.read(columns=["sample_id"]).column("sample_id").to_pylist()
        self.row_of = {s: i for i, s in enumerate(stats)}
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.group_of_row = np.repeat(np.arange(len(sizes)), sizes)
        self.row_in_group = np.concatenate([np.arange(n) for n in sizes])
        self.groups: OrderedDict[int, tuple] = OrderedDict()
        self.decoded_bytes = 0

    def group(self, g: int) -> tuple:
        import pyarrow.compute as pc

        if g in self.groups:
            self.groups.move_to_end(g)
            return self.groups[g]
        table = self.file.read_row_group(g, columns=["n_tokens", "topk_ids", "topk_logprobs", "tail_logmass"])
        counts = table.column("n_tokens").to_numpy()
        ids = pc.list_flatten(pc.list_flatten(table.column("topk_ids"))).to_numpy().reshape(-1, self.k)
        logprobs = logit_cache.decode_logprobs(
            pc.list_flatten(pc.list_flatten(table.column("topk_logprobs"))).to_numpy(), self.meta).reshape(-1, self.k)
        tail = pc.list_flatten(table.column("tail_logmass")).to_numpy()
        decoded = (np.concatenate([[0], np.cumsum(counts)]), ids, logprobs, tail)
        self.decoded_bytes += ids.nbytes + logprobs.nbytes + tail.nbytes
        self.groups[g] = decoded
        if len(self.groups) > self.max_groups:
            self.groups.popitem(last=False)
        return decoded

    def targets(self, sample_ids: list[str]):
        parts = []
        for sample in sample_ids:
            row = self.row_of[sample]
            start, ids, logprobs, tail = self.group(int(self.group_of_row[row]))
            at = int(self.row_in_group[row])
            span = slice(start[at], start[at + 1])
            parts.append((ids[span].astype(np.int64), logprobs[span], tail[span]))
        return [np.concatenate([p[i] for p in parts]) for i in range(3)]


def anonymous(process: psutil.Process) -> int:
    """Resident memory that is not a file's pages (those the OS shares between processes and
    drops under pressure): the heap the reader holds."""
    info = process.memory_info()
    return info.rss - info.shared


def needed_bytes(tokens: int, k: int, id_bytes: int) -> int:
    return tokens * (k * (id_bytes + 2) + 4)  # ids + fp16 log-probs + fp32 tail, as stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic cache goes (default: a temp dir)")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-cache-reads-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "ckpt-1.parquet"
    started = time.perf_counter()
    meta = write_synthetic_cache(path, args.rows, args.vocab, args.k, args.seed)
    write_s = time.perf_counter() - started
    print(f"synthetic cache: {meta['rows']} rows, {meta['tokens']} tokens, {meta['file_bytes'] / 1e9:.2f} GB "
          f"({meta['file_bytes'] / meta['tokens']:.0f} B/token), written in {write_s:.0f} s", flush=True)

    process = psutil.Process()
    anon_start = anonymous(process)
    lru = RowGroupLRU(path, meta)
    lengths = [int(n) for n in lru.file.read(columns=["n_tokens"]).column("n_tokens").to_numpy()]
    sample_ids = [f"s{row:06d}" for row in range(args.rows)]
    plan = training_plan(lengths, args.batch, 1, 1.0, seed=args.seed)
    batches = [[sample_ids[r] for r in step.micro_batches[0]] for step in plan[:args.micro_batches]]
    tokens = [sum(lengths[int(s[1:])] for s in batch) for batch in batches]
    id_bytes = np.dtype(meta["id_dtype"]).itemsize

    rows = []
    cpu = time.process_time()
    for batch in batches:
        lru.targets(batch)
    lru_cpu = (time.process_time() - cpu) / len(batches)
    lru_anon = anonymous(process) - anon_start
    rows.append({"reader": "row-group LRU (before)", "CPU s / micro-batch": lru_cpu,
                 "read amplification": lru.decoded_bytes / needed_bytes(sum(tokens), args.k, id_bytes),
                 "anonymous memory after (MB)": round(lru_anon / 1e6), "one-time decode": "-"})
    del lru

    started = time.perf_counter()
    shutil.rmtree(logit_cache.decoded_dir(path), ignore_errors=True)
    reader = logit_cache.open_cache(path)  # builds the decoded copy (once per cache, at cache-logits time)
    decode_s = time.perf_counter() - started
    decoded_bytes = sum(f.stat().st_size for f in logit_cache.decoded_dir(path).iterdir())
    anon_start = anonymous(process)
    cpu = time.process_time()
    for batch in batches:
        reader.targets(batch)
    new_cpu = (time.process_time() - cpu) / len(batches)
    new_anon = anonymous(process) - anon_start
    rows.append({"reader": "decoded copy (memory-mapped)", "CPU s / micro-batch": new_cpu, "read amplification": 1.0,
                 "anonymous memory after (MB)": round(new_anon / 1e6),
                 "one-time decode": f"{decode_s:.0f} s, {decoded_bytes / 1e9:.2f} GB"})

    print(machine_line())
    print(f"{len(batches)} micro-batches of {args.batch} samples, {np.mean(tokens):.0f} completion tokens each "
          f"(mean), k = {args.k}, V = {args.vocab}")
    print(format_table(rows))
    print(f"CPU per micro-batch, before / after: {lru_cpu / max(new_cpu, 1e-9):.0f}x")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
