"""Cost of one distillation step fed from the logit cache, versus plain SFT and online KD.

Three optimizer steps of the same student on the same batch (prepared ``demo`` training
samples), interleaved round by round with a rotating order:

* ``sft``: completion-only forward (``training.CompletionLM``), gold CE
  (``training.per_sample_mean_nll``), backward, gradient clipping, fused AdamW step;
* ``distill (cache)``: the same plus the teacher target read from a Parquet cache
  (``LogitCache.targets``; written beforehand by ``write_logit_cache``, k=50 fp16) and the
  distillation objective ``distill.sample_losses`` (convex, lambda=0.5, forward KL on the top-k +
  tail support) - what ``scd-pipeline distill`` does per micro-batch;
* ``online KD``: a no-grad teacher forward (LM head at completion positions only, then
  ``SparseTarget.from_logits`` at the same k) every step, then the same loss.

Targets: distill (cache) <= 1.15x sft; online KD / distill (cache) >= 1.5.

    .venv/bin/python benchmarks/bench_step.py          # SmolLM2 student_base / teacher_base if prepared
    .venv/bin/python benchmarks/bench_step.py --model tiny --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
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

from scd_pipeline.engine.batching import Batch, completion_logits, frame_batch
from scd_pipeline.engine.config import load_config
from scd_pipeline.engine.logit_cache import open_cache, write_logit_cache
from scd_pipeline.engine.training import CompletionLM, build_optimizer, per_sample_mean_nll
from scd_pipeline.math.losses import SparseTarget
from scd_pipeline.math.weighting import step_share
from scd_pipeline.stages.distill.objective import divergence_for, sample_losses


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", choices=_common.MODEL_CHOICES, default="auto",
                        help="smollm2: results/models/{student,teacher}_base; tiny: random tiny Llamas; auto")
    parser.add_argument("--task", default="demo", help="task prepared with prepare_data")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step (distill.batch_size)")
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds (one batch each), after 1 warm-up")
    parser.add_argument("--top-k", type=int, default=50, help="k of the cache and of the online target")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    config = load_config()
    distill = config["distill"]
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        workdir = Path(tmp)
        teacher = load_bench_model(args.model, "teacher", workdir, tiny_layers=4, tiny_seed=0)
        student = load_bench_model(args.model, "student", workdir, tiny_layers=2, tiny_seed=1)
        pad_id = student.tokenizer.pad_token_id
        n_batches = args.rounds + 1
        frame = prepared_split(args.task, teacher.tokenizer_dir, workdir, args.batch_size * n_batches)
        batches: list[Batch] = [frame_batch(frame, list(range(i * args.batch_size, (i + 1) * args.batch_size)), pad_id)
                                for i in range(n_batches)]
        sample_ids = frame["sample_id"].to_numpy()
        cache_file = workdir / "cache.parquet"
        write_logit_cache(teacher.model, teacher.tokenizer, frame, cache_file, {"task": args.task, "split": "train"},
                          top_k=args.top_k, dtype=config["cache"]["dtype"])
        cache = open_cache(cache_file)
        divergence = divergence_for(distill, "forward_kl")

        model = student.model.train()
        wrapper = CompletionLM(model)
        optimizer = build_optimizer(wrapper, distill["lr"], distill["weight_decay"])

        def optimizer_step(batch: Batch, per_sample_loss: Callable[[torch.Tensor, Batch], torch.Tensor]) -> None:
            logits = wrapper(batch.input_ids, batch.attention_mask, batch.predict_mask)
            weights = torch.ones(batch.num_samples)
            step_share(per_sample_loss(logits, batch), weights, float(weights.sum())).backward()
            torch.nn.utils.clip_grad_norm_(wrapper.parameters(), distill["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def distill_loss(target_of: Callable[[Batch], SparseTarget]) -> Callable[[torch.Tensor, Batch], torch.Tensor]:
            def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
                target = target_of(batch)
                return sample_losses(logits, batch, target, distill["kd_weight"], divergence, distill["objective"]).loss
            return loss

        def cached_target(batch: Batch) -> SparseTarget:
            counts = [len(frame["completion_ids"].iat[r]) for r in batch.index]
            return cache.targets(sample_ids[batch.index].tolist(), counts)

        def online_target(batch: Batch) -> SparseTarget:
            with torch.no_grad():
                return SparseTarget.from_logits(completion_logits(teacher.model, batch), args.top_k)

        variants = {
            "sft": lambda r: optimizer_step(batches[r], lambda logits, batch: per_sample_mean_nll(logits, batch)),
            "distill (cache)": lambda r: optimizer_step(batches[r], distill_loss(cached_target)),
            "online KD": lambda r: optimizer_step(batches[r], distill_loss(online_target)),
        }
        times = interleaved_times(variants, rounds=args.rounds, warmup=1)
        rows = [{"variant": name, "median s/step": statistics.median(seconds), "min s/step": min(seconds),
                 "x sft (median ratio)": median_ratio(seconds, times["sft"]),
                 "x distill (cache) (median ratio)": median_ratio(seconds, times["distill (cache)"])}
                for name, seconds in times.items()]
        tokens = float(torch.tensor([b.attention_mask.sum() for b in batches]).float().mean())
        print(f"# step cost; student: {student.name}; teacher: {teacher.name}; task {args.task}, batch "
              f"{args.batch_size} (~{tokens:.0f} tokens), k={args.top_k}, forward KL, {args.rounds} rounds "
              f"after 1 warm-up; {machine_line()}")
        print(format_table(rows))
        overhead = median_ratio(times["distill (cache)"], times["sft"])
        speedup = median_ratio(times["online KD"], times["distill (cache)"])
        print(f"\ndistill (cache) / sft = {overhead:.3f} (target <= 1.15: {'met' if overhead <= 1.15 else 'missed'})")
        print(f"online KD / distill (cache) = {speedup:.3f} (target >= 1.5: {'met' if speedup >= 1.5 else 'missed'})")


if __name__ == "__main__":
    main()
