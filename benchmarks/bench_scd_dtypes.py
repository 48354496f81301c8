"""SCD's terms and choice from fp32, fp16 and int8 caches of the same real teacher outputs.

Reads a finished run (``results/{task}/teacher/ckpt-*``, ``data/train.parquet``,
``subdomains.json`` for the probe ids and T*), runs every teacher checkpoint once over the probe
samples, keeps its top-k (``cache.top_k``) as the cache writer does, and stores the log-probs in
each ``cache.dtype`` (fp32, fp16, int8: the package's own codec). It then computes, per dtype,
KL(T* || c) for every checkpoint c, KL(S || c) for two students S (the untrained pruned student
``models/student_base``, SCD's first phase with ``distill.init: base``; and ``student_sft``), the
SCD choice argmin_c KL(T* || c) + KL(S || c), and the range of the stored mass (top-k + tail) per
token. Every number comes from ``SparseTarget.buckets`` (renormalised), the view the losses and
the schedule use; the ``stored as is`` rows read the same values without renormalising, as the
schedule did before, to show what the normalisation changes.

    .venv/bin/python benchmarks/bench_scd_dtypes.py --task demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import REPO_ROOT, format_table, machine_line

from scd_pipeline.engine.batching import read_split
from scd_pipeline.engine.config import load_config
from scd_pipeline.engine.logit_cache import LOGPROB_STEP, decode_logprobs, encode_logprobs
from scd_pipeline.engine.models import load_model
from scd_pipeline.engine.scoring import forward_batches
from scd_pipeline.math.losses import LOG_MASS_FLOOR, SparseTarget
from scd_pipeline.math.schedules import cache_kl, mean_token_kl, scd_choose, student_cache_kl

DTYPES = ("fp32", "fp16", "int8")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="demo")
    parser.add_argument("--results", default=str(REPO_ROOT / "results"), help="results_dir of the run")
    parser.add_argument("--batch-size", type=int, default=16)
    return parser.parse_args()


def logits_over(model_dir, frame, batch_size: int) -> tuple[torch.Tensor, list[int]]:
    """Completion logits (N, V) over ``frame`` in its row order, and each row's token count."""
    model, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
    by_row: dict[int, torch.Tensor] = {}
    for batch, logits in forward_batches(model, frame, batch_size, tokenizer.pad_token_id):
        counts = torch.bincount(batch.token_sample, minlength=batch.num_samples).tolist()
        for row, chunk in zip(batch.index, logits.split(counts), strict=True):
            by_row[row] = chunk
    rows = sorted(by_row)
    return torch.cat([by_row[r] for r in rows]), [len(by_row[r]) for r in rows]


def stored_as(target: SparseTarget, dtype: str) -> SparseTarget:
    codes = encode_logprobs(target.logprobs.numpy(), dtype)
    decoded = decode_logprobs(codes, {"dtype": dtype, "logprob_step": LOGPROB_STEP})
    return SparseTarget(target.ids, torch.from_numpy(decoded), target.tail_logmass, target.vocab_size)


class AsStored(SparseTarget):
    """The pre-normalisation reading: the stored values taken as they are."""

    def buckets(self, temperature: float | None = None) -> torch.Tensor:
        values = self.logprobs.float().clamp(min=LOG_MASS_FLOOR)
        tail = self.tail_logmass.float().clamp(min=LOG_MASS_FLOOR)[:, None]
        return torch.cat([values, tail], dim=-1) if self.has_tail else values

    def normalized(self, temperature: float | None = None) -> SparseTarget:
        return self


def main() -> None:
    args = parse_args()
    config = load_config(None, {"task": args.task, "results_dir": args.results})
    root = Path(args.results) / args.task
    summary = json.loads((root / "subdomains.json").read_text())
    best, probe_ids = int(summary["best_index"]), summary["probe"]["sample_ids"]
    train = read_split(root / "data" / "train.parquet")
    probe = train.set_index("sample_id", drop=False).loc[probe_ids].reset_index(drop=True)
    top_k = config["cache"]["top_k"]
    checkpoints = sorted(int(p.name.removeprefix("ckpt-")) for p in (root / "teacher").glob("ckpt-*"))
    exact = {c: SparseTarget.from_logits(logits_over(root / "teacher" / f"ckpt-{c}", probe, args.batch_size)[0], top_k)
             for c in checkpoints}
    students = {"student_base": logits_over(root.parent / "models" / "student_base", probe, args.batch_size)[0],
                "student_sft": logits_over(root / "student_sft", probe, args.batch_size)[0]}
    print(machine_line())
    print(f"task {args.task}: {len(probe)} probe samples, {exact[best].num_tokens} completion tokens, "
          f"k = {top_k}, T* = ckpt-{best}, checkpoints {checkpoints}\n")
    rows, choices = [], []
    for dtype in DTYPES:
        for reading in ("normalised", "stored as is"):
            caches = {c: stored_as(t, dtype) for c, t in exact.items()}
            if reading == "stored as is":
                caches = {c: AsStored(t.ids, t.logprobs, t.tail_logmass, t.vocab_size) for c, t in caches.items()}
            mass = torch.cat([caches[best].logprobs, caches[best].tail_logmass[:, None]], -1).logsumexp(-1).exp()
            kl_best = {c: mean_token_kl([cache_kl(caches[best], caches[c])]) for c in checkpoints}
            row = {"dtype": dtype, "reading": reading, "T* mass min": float(mass.min()), "T* mass max": float(mass.max())}
            row.update({f"KL(T*||{c})": kl_best[c] for c in checkpoints})
            rows.append(row)
            for name, logits in students.items():
                kl_student = {c: mean_token_kl([student_cache_kl(logits, caches[c])]) for c in checkpoints}
                chosen, candidates = scd_choose(kl_best, kl_student)
                ordered = sorted(r["sum"] for r in candidates)
                choices.append({"dtype": dtype, "reading": reading, "student": name, "choice": chosen,
                                "margin to 2nd": ordered[1] - ordered[0],
                                **{f"KL(S||{c})": kl_student[c] for c in checkpoints}})
    print("KL(T* || c), nats per token:\n")
    print(format_table(rows))
    print("\nSCD choice and KL(S || c) for two students:\n")
    print(format_table(choices))


if __name__ == "__main__":
    main()
