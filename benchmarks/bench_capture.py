"""Cache capture throughput versus a bare teacher forward over the same samples.

Three ways to run the teacher over one batch of prepared training samples, interleaved batch by
batch (the order rotates every round, so load on a shared machine hits all three alike):

* ``capture``: ``scd_pipeline.stages.cache_logits.write_logit_cache`` on that batch (forward, LM head at the
  completion positions only, gold NLL, top-k + tail, Parquet write with the package's encodings,
  sidecar) into a temporary file;
* ``bare forward``: ``model(input_ids, attention_mask).logits``, full-vocabulary logits at every
  position, nothing kept: what a teacher forward costs without a cache;
* ``completion-only forward``: ``batching.completion_logits`` alone (the LM head at completion
  positions), to show what the top-k and the writing add on top of the forward.

Throughput ratio = median over rounds of t(bare) / t(capture); target >= 0.9.

    .venv/bin/python benchmarks/bench_capture.py                    # SmolLM2 if prepared, else tiny
    .venv/bin/python benchmarks/bench_capture.py --model tiny --samples 64 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import _common  # noqa: F401  (pins torch to one thread before anything imports it)
import torch
from _common import (
    format_table,
    interleaved_times,
    load_bench_model,
    machine_line,
    median_ratio,
    prepared_split,
)

from scd_pipeline.engine.batching import completion_logits, frame_batch, length_grouped_batches
from scd_pipeline.engine.logit_cache import LOGPROB_DTYPES, write_logit_cache


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", choices=_common.MODEL_CHOICES, default="auto",
                        help="teacher: results/models/teacher_base (smollm2), a tiny random Llama, or auto")
    parser.add_argument("--task", default="demo", help="task prepared with prepare_data")
    parser.add_argument("--samples", type=int, default=64, help="training samples (first rows of the split)")
    parser.add_argument("--batch-size", type=int, default=16, help="teacher batch size (cache.batch_size)")
    parser.add_argument("--top-k", type=int, default=50, help="cache.top_k")
    parser.add_argument("--dtype", default="fp16", choices=sorted(LOGPROB_DTYPES), help="cache.dtype")
    parser.add_argument("--repeats", type=int, default=1, help="passes over all batches (after one warm-up batch)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        workdir = Path(tmp)
        loaded = load_bench_model(args.model, "teacher", workdir)
        model, pad_id = loaded.model, loaded.tokenizer.pad_token_id
        frame = prepared_split(args.task, loaded.tokenizer_dir, workdir, args.samples)
        lengths = [len(p) + len(c) for p, c in zip(frame["prompt_ids"], frame["completion_ids"], strict=True)]
        batches = length_grouped_batches(lengths, args.batch_size, seed=None)  # the capture's own order
        collated = [frame_batch(frame, rows, pad_id) for rows in batches]
        parts = [frame.iloc[rows].reset_index(drop=True) for rows in batches]

        def batch_of(round_index: int) -> int:
            return round_index % len(batches)

        def capture(round_index: int) -> None:
            part = parts[batch_of(round_index)]
            write_logit_cache(model, loaded.tokenizer, part, workdir / "capture.parquet",
                              {"task": args.task, "split": "train"}, top_k=args.top_k, dtype=args.dtype,
                              batch_size=args.batch_size, rows_per_group=len(part))

        def bare_forward(round_index: int) -> torch.Tensor:
            batch = collated[batch_of(round_index)]
            with torch.inference_mode():
                return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             use_cache=False).logits

        def completion_only(round_index: int) -> None:
            with torch.inference_mode():
                completion_logits(model, collated[batch_of(round_index)])

        rounds = len(batches) * args.repeats
        times = interleaved_times({"capture": capture, "bare forward": bare_forward,
                                   "completion-only forward": completion_only}, rounds=rounds, warmup=1)
        measured = [batch_of(r) for r in range(1, rounds + 1)]
        tokens = sum(int(collated[b].attention_mask.sum()) for b in measured)
        completion_tokens = sum(int(collated[b].target_ids.numel()) for b in measured)
        rows = [{"variant": name, "median s/batch": statistics.median(seconds),
                 "tokens/s": tokens / sum(seconds), "completion tokens/s": completion_tokens / sum(seconds),
                 "throughput vs bare (median ratio)": median_ratio(times["bare forward"], seconds)}
                for name, seconds in times.items()]
        print(f"# capture throughput; teacher: {loaded.name}; task {args.task}, {len(frame)} samples, "
              f"{len(batches)} batches of {args.batch_size}, k={args.top_k} {args.dtype}, {rounds} rounds "
              f"after 1 warm-up; {machine_line()}")
        print(format_table(rows))
        ratio = median_ratio(times["bare forward"], times["capture"])
        print(f"\ncapture throughput / bare forward = {ratio:.3f} (target >= 0.9: "
              f"{'met' if ratio >= 0.9 else 'missed'})")


if __name__ == "__main__":
    main()
