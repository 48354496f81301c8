"""How the teacher-logit cache grows with the number of samples and of teacher checkpoints.

* samples: one cache (``write_logit_cache``, k=50 fp16) over the first n training samples, for
  several n; bytes and capture seconds (each size captured ``--repeats`` times, sizes in
  rotating order, median seconds);
* checkpoints: the pipeline writes one cache per teacher checkpoint, so total size and capture
  time should be linear in the checkpoint count by construction; measured with 1, 2, 4 tiny
  random "checkpoints" (different seeds) over the same samples.

Each table ends with the least-squares slope and intercept, and the fitted lines give the size
and capture time of a full run (``--full-samples`` x ``--full-checkpoints``).

    .venv/bin/python benchmarks/bench_scaling.py                     # tiny models (default)
    .venv/bin/python benchmarks/bench_scaling.py --model smollm2 --samples 16 32 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import _common
from _common import (
    format_table,
    least_squares_slope,
    load_bench_model,
    machine_line,
    prepared_split,
)

from scd_pipeline.engine.logit_cache import LOGPROB_DTYPES, write_logit_cache


def capture(model, tokenizer, frame, path: Path, args: argparse.Namespace) -> dict:
    """Write one cache; return its sidecar record (``file_bytes``, ``tokens``, ``capture_seconds``)."""
    return write_logit_cache(model, tokenizer, frame, path, {"task": args.task, "split": "train"}, top_k=args.top_k,
                             dtype=args.dtype, batch_size=args.batch_size)


def fit_line(rows: list[dict], x: str, y: str) -> dict:
    slope, intercept = least_squares_slope([row[x] for row in rows], [row[y] for row in rows])
    return {"fit": f"{y} ~ {x}", "slope": slope, "intercept": intercept}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", choices=_common.MODEL_CHOICES, default="tiny",
                        help="teacher for the sample sweep (checkpoints are always tiny models)")
    parser.add_argument("--task", default="demo", help="task prepared with prepare_data")
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 128, 256, 512], help="sample counts")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[1, 2, 4], help="checkpoint counts")
    parser.add_argument("--checkpoint-samples", type=int, default=128, help="samples per checkpoint cache")
    parser.add_argument("--repeats", type=int, default=3, help="captures per sample count (median seconds)")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--dtype", default="fp16", choices=sorted(LOGPROB_DTYPES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--full-samples", type=int, default=640, help="extrapolate to this many samples")
    parser.add_argument("--full-checkpoints", type=int, default=8, help="... and this many checkpoints")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        workdir = Path(tmp)
        teacher = load_bench_model(args.model, "teacher", workdir)
        frame = prepared_split(args.task, teacher.tokenizer_dir, workdir, max(args.samples))
        seconds: dict[int, list[float]] = {n: [] for n in args.samples}
        records: dict[int, dict] = {}
        for repeat in range(args.repeats):
            shift = repeat % len(args.samples)
            for n in args.samples[shift:] + args.samples[:shift]:
                records[n] = capture(teacher.model, teacher.tokenizer, frame.iloc[:n], workdir / f"n{n}.parquet", args)
                seconds[n].append(records[n]["capture_seconds"])
        sample_rows = [{"samples": n, "tokens": records[n]["tokens"], "bytes": records[n]["file_bytes"],
                        "B/token": records[n]["bytes_per_token"], "capture s (median)": statistics.median(seconds[n])}
                       for n in args.samples]
        sample_fits = [fit_line(sample_rows, "samples", "bytes"), fit_line(sample_rows, "samples", "capture s (median)")]

        # Checkpoints are tiny models (seeds 0, 1, ...): samples tokenized with their byte tokenizer.
        tiny = load_bench_model("tiny", "teacher", workdir)
        samples = prepared_split(args.task, tiny.tokenizer_dir, workdir / "tiny", args.checkpoint_samples)
        checkpoint_rows = []
        for count in args.checkpoints:
            metas = [capture(load_bench_model("tiny", "teacher", workdir, tiny_seed=seed).model, tiny.tokenizer,
                             samples, workdir / f"c{count}-ckpt-{seed + 1}.parquet", args)
                     for seed in range(count)]
            checkpoint_rows.append({"checkpoints": count, "samples": len(samples),
                                    "bytes (all caches)": sum(m["file_bytes"] for m in metas),
                                    "capture s (all caches)": sum(m["capture_seconds"] for m in metas)})
        checkpoint_fits = [fit_line(checkpoint_rows, "checkpoints", "bytes (all caches)"),
                           fit_line(checkpoint_rows, "checkpoints", "capture s (all caches)")]

        print(f"# cache scaling; k={args.top_k} {args.dtype}, task {args.task}; {machine_line()}")
        print(f"\n## samples (teacher: {teacher.name})")
        print(format_table(sample_rows))
        print()
        print(format_table(sample_fits))
        print(f"\n## checkpoints (tiny random Llamas, {len(samples)} samples each)")
        print(format_table(checkpoint_rows))
        print()
        print(format_table(checkpoint_fits))
        bytes_fit, seconds_fit = sample_fits
        full_bytes = (bytes_fit["slope"] * args.full_samples + bytes_fit["intercept"]) * args.full_checkpoints
        full_seconds = (seconds_fit["slope"] * args.full_samples + seconds_fit["intercept"]) * args.full_checkpoints
        print(f"\nfitted: {args.full_samples} samples x {args.full_checkpoints} checkpoints -> "
              f"{full_bytes / 1e6:.2f} MB, {full_seconds:.0f} s of capture with {teacher.name}")


if __name__ == "__main__":
    main()
