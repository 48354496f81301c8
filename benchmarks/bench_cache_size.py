"""Teacher-logit cache: bytes per cached token and KL(full || reconstructed) for several k and dtypes.

For each task (default: ``demo``, 2-token completions, and ``nrner``, list completions of ~35
tokens), the teacher runs once over the first N training samples (prepared with
``scd_pipeline.stages.prepare_data.prepare_data`` into a temporary folder, using the teacher's tokenizer). Each
(k, dtype) cache is then written by the package's own ``write_logit_cache`` (the decoder's hidden
states are replayed from the first pass, so the LM head, top-k, encoding and Parquet writing all
run for real per configuration), read back with ``open_cache``, and compared with the full
distribution:

* ``B/token``: file bytes / completion tokens (what the sidecar reports);
* ``top-k B/token``: the compressed bytes of the per-token columns only (``ids`` =
  ``topk_ids``, ``logprobs`` = ``topk_logprobs``, ``tail`` = ``tail_logmass``): the figure
  DistillKit's ~114 B/token (k=50) and ~300 B/token (k=128) describe;
* ``per-sample``: the per-sample columns (id, NLL, correct, counts); ``footer``: the Parquet
  footer, schema and identity metadata (a fixed size per file);
* ``KL``: mean over completion tokens of KL(p || p_hat), p the teacher's full softmax, p_hat the
  cache's reconstruction (cached log-probs at their ids, the tail mass spread uniformly over the
  other ids, renormalised: what the distillation losses read), in nats;
* ``tail mass``: mean teacher probability outside the top k.

The k=50 fp16 table is also rewritten with other Parquet encodings (``--encodings-k``), to size
format alternatives without changing the package; one lossy alternative, log-probs stored as
8-bit codes on a 0.1-nat grid, is sized there and its KL reported in ``mean KL, 8-bit log-probs``.

    .venv/bin/python benchmarks/bench_cache_size.py                 # SmolLM2 if prepared, else tiny
    .venv/bin/python benchmarks/bench_cache_size.py --model tiny --samples 32
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

import _common  # noqa: F401  (pins torch to one thread before anything imports it)
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from _common import format_table, load_bench_model, machine_line, prepared_split, timed

from scd_pipeline.engine.logit_cache import (
    LOGPROB_DTYPES,
    LOGPROB_STEP,
    PARQUET_OPTIONS,
    decode_logprobs,
    encode_logprobs,
    open_cache,
    write_logit_cache,
)
from scd_pipeline.engine.scoring import forward_batches
from scd_pipeline.math.losses import SparseTarget

DISTILLKIT_BYTES_PER_TOKEN = {50: 114.0, 128: 300.0}  # published figures of its compressed cache
PER_TOKEN_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logmass")


class ReplayTeacher(torch.nn.Module):
    """A causal LM whose decoder runs once per distinct batch; later calls replay its hidden states.

    ``write_logit_cache`` reads a model only through ``get_decoder()`` and
    ``get_output_embeddings()``; replaying the decoder lets one teacher forward serve every
    (k, dtype) configuration while the LM head and everything after it still run each time.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self._hidden: dict[tuple, torch.Tensor] = {}

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def get_decoder(self):
        return self._decode

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = False):
        key = (tuple(input_ids.shape), input_ids.numpy().tobytes(), attention_mask.numpy().tobytes())
        if key not in self._hidden:
            self._hidden[key] = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                                         use_cache=use_cache).last_hidden_state
        return SimpleNamespace(last_hidden_state=self._hidden[key])


INT8_META = {"dtype": "int8", "logprob_step": LOGPROB_STEP}


def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over row groups (Parquet metadata)."""
    metadata = pq.ParquetFile(path).metadata
    totals: dict[str, int] = {}
    for group in range(metadata.num_row_groups):
        for column in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(column)
            name = chunk.path_in_schema.split(".")[0]
            totals[name] = totals.get(name, 0) + chunk.total_compressed_size
    return totals


def reconstruction_kl(full_logprobs: torch.Tensor, cached) -> torch.Tensor:
    """Per-token KL(full || reconstruction) (N,), the reconstruction as the losses read it."""
    reconstructed = cached.dense_logprobs()
    return (full_logprobs.exp() * (full_logprobs - reconstructed)).sum(dim=-1)


def measure_config(teacher: ReplayTeacher, tokenizer, frame: pd.DataFrame, workdir: Path, top_k: int, dtype: str,
                   batch_size: int) -> dict:
    """Write one cache, read it back and compare it with the full teacher distribution."""
    path = workdir / f"k{top_k}-{dtype}.parquet"
    meta = write_logit_cache(teacher, tokenizer, frame, path, {"task": "benchmark", "split": "train"}, top_k=top_k,
                             dtype=dtype, batch_size=batch_size)
    cache = open_cache(path)
    sample_ids = frame["sample_id"].to_numpy()
    kls, kls_8bit, tails = [], [], []
    for batch, logits in forward_batches(teacher, frame, batch_size, tokenizer.pad_token_id):
        counts = torch.bincount(batch.token_sample, minlength=batch.num_samples).tolist()
        cached = cache.targets(sample_ids[batch.index].tolist(), counts)
        full = torch.log_softmax(logits, dim=-1)
        kls.append(reconstruction_kl(full, cached))
        coarse = torch.from_numpy(decode_logprobs(encode_logprobs(cached.logprobs.numpy(), "int8"), INT8_META))
        kls_8bit.append(reconstruction_kl(full, SparseTarget(cached.ids, coarse, cached.tail_logmass,
                                                             cached.vocab_size)))
        tails.append(cached.tail_logmass.exp())
    columns = column_bytes(path)
    per_token = sum(columns[name] for name in PER_TOKEN_COLUMNS)
    per_sample = sum(columns.values()) - per_token
    tokens = meta["tokens"]
    reference = DISTILLKIT_BYTES_PER_TOKEN.get(top_k)
    return {"k": top_k, "dtype": dtype, "tokens": tokens, "B/token": meta["bytes_per_token"],
            "top-k B/token": per_token / tokens, "ids": columns["topk_ids"] / tokens,
            "logprobs": columns["topk_logprobs"] / tokens, "tail": columns["tail_logmass"] / tokens,
            "per-sample B/token": per_sample / tokens,
            "footer B/token": (meta["file_bytes"] - per_token - per_sample) / tokens,
            "DistillKit B/token": reference if reference is not None else "",
            "mean KL (nats)": float(torch.cat(kls).mean()), "max KL": float(torch.cat(kls).max()),
            "tail mass": float(torch.cat(tails).mean()),
            "mean KL, 8-bit log-probs": float(torch.cat(kls_8bit).mean())}


IDS_COLUMN = "topk_ids.list.element.list.element"
LOGPROBS_COLUMN = "topk_logprobs.list.element.list.element"
# Parquet writer settings compared on the same cache table (the first is the package's).
ENCODINGS = {
    "package (zstd 6, dictionary ids, byte-stream-split log-probs)": PARQUET_OPTIONS,
    "plain zstd 6": {"compression": "zstd", "compression_level": 6, "use_dictionary": False},
    "package encodings, zstd 19": {**PARQUET_OPTIONS, "compression_level": 19},
    "delta-packed ids, byte-stream-split log-probs, zstd 6": {
        **PARQUET_OPTIONS, "use_dictionary": ["sample_id"],
        "column_encoding": {IDS_COLUMN: "DELTA_BINARY_PACKED", LOGPROBS_COLUMN: "BYTE_STREAM_SPLIT"}},
}


def with_8bit_logprobs(table: pa.Table) -> pa.Table:
    """The cache table with ``topk_logprobs`` replaced by their 8-bit codes (same list shape)."""
    outer = table.column("topk_logprobs").combine_chunks()
    inner = outer.values
    codes = encode_logprobs(inner.values.to_numpy(zero_copy_only=False), "int8")
    column = pa.ListArray.from_arrays(outer.offsets, pa.ListArray.from_arrays(inner.offsets, pa.array(codes)))
    return table.set_column(table.schema.get_field_index("topk_logprobs"), "topk_logprobs", column)


def encoding_rows(path: Path, workdir: Path) -> list[dict]:
    """The same cache table rewritten with each of ``ENCODINGS`` (and with 8-bit log-probs):
    bytes/token and write speed."""
    table = pq.read_table(path)
    tokens = int(table.column("n_tokens").to_numpy().sum())
    rows = []
    target = workdir / "encoding.parquet"
    variants = [(name, table, options) for name, options in ENCODINGS.items()]
    variants.append((f"8-bit log-probs ({LOGPROB_STEP} nats/code), dictionary ids, zstd 6",
                     with_8bit_logprobs(table), {**PARQUET_OPTIONS, "column_encoding": None}))
    for name, variant, options in variants:
        seconds = min(timed(lambda variant=variant, options=options: pq.write_table(variant, target, **options))[0]
                      for _ in range(3))
        rows.append({"encoding": name, "B/token": target.stat().st_size / tokens,
                     "ids": column_bytes(target)["topk_ids"] / tokens,
                     "logprobs": column_bytes(target)["topk_logprobs"] / tokens,
                     "write tokens/s (best of 3)": tokens / seconds})
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", choices=_common.MODEL_CHOICES, default="auto",
                        help="teacher: results/models/teacher_base (smollm2), a tiny random Llama, or auto")
    parser.add_argument("--tasks", nargs="+", default=["demo", "nrner"],
                        help="tasks prepared with prepare_data (JMED-LLM tasks read ../shared/data/jmed-llm)")
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 16],
                        help="training samples per task (one value, or one per task)")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 50, 64, 128], help="top-k values")
    parser.add_argument("--dtypes", nargs="+", default=sorted(LOGPROB_DTYPES), choices=sorted(LOGPROB_DTYPES))
    parser.add_argument("--batch-size", type=int, default=8, help="teacher batch size")
    parser.add_argument("--encodings-k", type=int, default=50,
                        help="also rewrite the fp16 cache of this k with other Parquet encodings (0: skip)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    samples = args.samples * len(args.tasks) if len(args.samples) == 1 else args.samples
    if len(samples) != len(args.tasks):
        raise SystemExit("--samples: give one value or one per task")
    with tempfile.TemporaryDirectory(prefix="bench-cache-size-") as tmp:
        workdir = Path(tmp)
        loaded = load_bench_model(args.model, "teacher", workdir)
        print(f"# cache size and fidelity; teacher: {loaded.name}; {machine_line()}")
        for task, n_samples in zip(args.tasks, samples, strict=True):
            frame = prepared_split(task, loaded.tokenizer_dir, workdir, n_samples)
            teacher = ReplayTeacher(loaded.model)
            completion = frame["completion_ids"].map(len)
            print(f"\n## task {task}: {len(frame)} samples, completion tokens/sample mean "
                  f"{completion.mean():.1f} (min {completion.min()}, max {completion.max()}), "
                  f"prompt tokens mean {frame['prompt_ids'].map(len).mean():.0f}")
            rows = [measure_config(teacher, loaded.tokenizer, frame, workdir, k, dtype, args.batch_size)
                    for dtype in args.dtypes for k in args.ks if k <= loaded.model.config.vocab_size]
            print(format_table(rows))
            if args.encodings_k and "fp16" in args.dtypes and args.encodings_k in args.ks:
                print(f"\nParquet encodings of the k={args.encodings_k} fp16 cache ({task}):")
                print(format_table(encoding_rows(workdir / f"k{args.encodings_k}-fp16.parquet", workdir)))


if __name__ == "__main__":
    main()
