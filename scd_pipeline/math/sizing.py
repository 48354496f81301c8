"""What a run costs, from the model shapes and the data: FLOPs, time, GPU and host memory, disk.

Every figure is an estimate from counts, not a measurement, and says what it leaves out:

- compute: 6 P FLOPs per trained token (forward and backward), 2 P per scored token; time =
  FLOPs / (GPUs x peak x utilisation). Generation for list answers is not counted.
- GPU memory of a training process: the states, 16 bytes per parameter (fp32 weights, gradients
  and AdamW's two moments), split over the GPUs under FSDP, whole under DDP; the bf16 copies the
  forward runs on (2 bytes per parameter; one layer at a time under FSDP); activations, about
  34 h bytes per token and layer in bf16 (2 h with activation checkpointing, plus one layer's 34 h);
  and the logit path at completion positions, 5 fp32 (tokens, V) buffers. Allocator slack and the
  framework's buffers come on top (count 10-20%).
- host memory: every training process loads the model in fp32 on the CPU before it moves it to
  its GPU (4 bytes per parameter each); inference materialises bf16 (2 bytes per parameter).
- disk: published checkpoints and students in the training precision, bf16 on a GPU (2 bytes per
  parameter), the resume state of a training run (16 bytes per parameter in all, each process
  saving its own shards, twice while it is swapped), caches: the Parquet file at most k x (id bytes
  + 2) + 12 bytes per completion token before compression (measured 102-148 at k = 50, V = 49,152)
  and its decoded copy that training memory-maps, k x (id bytes + 2) + 4 bytes per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1e9
STATE_BYTES = 16          # per trained parameter: fp32 weights, gradients, AdamW m and v
PUBLISHED_BYTES = 2       # per parameter of a published checkpoint or student: bf16
ACTIVATION_FACTOR = 34    # bytes per token, layer and hidden unit in bf16 without checkpointing
CHECKPOINTED_FACTOR = 2   # what activation checkpointing keeps per layer: its bf16 input
LOGIT_BUFFERS = 5         # fp32 (tokens, V) tensors alive at the loss
MEMORY_MARGIN = 1.25      # host memory a job requests over its estimate
RUNTIME_MARGIN = 2.0      # runtime a job requests over its FLOP estimate (generation is not counted)
START_MINUTES = 15        # loading, saving and start-up on top of the compute


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    vocab: int            # rows of the LM head


@dataclass(frozen=True)
class Workload:
    train_rows: int
    val_rows: int
    test_rows: int
    prompt_tokens: float      # mean per row
    completion_tokens: float  # mean per row

    @property
    def tokens_per_row(self) -> float:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Hardware:
    gpus: int                     # processes of a training job (1 for the other jobs)
    peak_tflops: float = 989.0    # one H100 SXM, bf16 dense
    utilisation: float = 0.4      # model FLOPs utilisation assumed


@dataclass(frozen=True)
class Estimate:
    """One rule: jobs, and per job its GPUs, FLOPs, hours, GPU memory per GPU, host memory, disk."""

    rule: str
    jobs: int
    gpus: int
    flops: float
    hours: float
    gpu_memory_gb: float
    host_memory_gb: float
    disk_gb: float

    @property
    def total_gpu_hours(self) -> float:
        return self.jobs * self.gpus * self.hours


def hours(flops: float, gpus: int, hardware: Hardware) -> float:
    return flops / (max(gpus, 1) * hardware.peak_tflops * 1e12 * hardware.utilisation) / 3600


def training_gpu_memory(shape: ModelShape, gpus: int, fsdp: bool, micro_tokens: float,
                        micro_completion_tokens: float, checkpointing: bool) -> float:
    """Bytes per GPU of one training process (see the module doc for what it counts)."""
    share = gpus if fsdp else 1
    states = STATE_BYTES * shape.params / share
    compute_copy = 2 * (shape.params / shape.layers if fsdp else shape.params)
    per_layer = (CHECKPOINTED_FACTOR if checkpointing else ACTIVATION_FACTOR) * shape.hidden * micro_tokens
    activations = per_layer * shape.layers + (ACTIVATION_FACTOR * shape.hidden * micro_tokens if checkpointing else 0)
    logits = LOGIT_BUFFERS * 4 * micro_completion_tokens * shape.vocab
    return states + compute_copy + activations + logits


def inference_gpu_memory(shape: ModelShape, batch_tokens: float, batch_completion_tokens: float) -> float:
    """Bytes of one scoring process: bf16 weights, one layer's activations, the logit path."""
    return 2 * shape.params + ACTIVATION_FACTOR * shape.hidden * batch_tokens + \
        LOGIT_BUFFERS * 4 * batch_completion_tokens * shape.vocab


def cache_bytes_per_token(top_k: int, vocab: int) -> int:
    """The Parquet file's upper bound before compression (k ids and k fp16 log-probs, the tail
    mass, offsets) plus the decoded copy (the same lists uncompressed, the tail mass)."""
    id_bytes = 2 if vocab <= 1 << 16 else 4
    return top_k * (id_bytes + 2) + 12 + top_k * (id_bytes + 2) + 4


def plan_estimates(teacher: ModelShape, student: ModelShape, work: Workload, hardware: Hardware, *,
                   checkpoints: int, teacher_epochs: float, student_epochs: float, phases: int,
                   epochs_per_phase: float, methods: int, replicates: int, top_k: int, sft_batch: int,
                   distill_batch: int, score_batch: int, sft_checkpointing: bool, distill_checkpointing: bool,
                   fsdp: bool) -> list[Estimate]:
    """Per rule of one task's workflow: what each job costs (see the module doc)."""
    train_tokens = work.train_rows * work.tokens_per_row
    gpus = hardware.gpus

    def train(rule: str, shape: ModelShape, epochs: float, jobs: int, batch: int, checkpointing: bool,
              saved: float, extra_flops: float = 0.0) -> Estimate:
        flops = 6 * shape.params * train_tokens * epochs + extra_flops
        memory = training_gpu_memory(shape, gpus, fsdp, batch * work.tokens_per_row,
                                     batch * work.completion_tokens, checkpointing)
        return Estimate(rule, jobs, gpus, flops, hours(flops, gpus, hardware), memory / GB,
                        gpus * 4 * shape.params / GB, (saved + 2 * STATE_BYTES * shape.params) / GB)

    def score(rule: str, shape: ModelShape, rows: int, jobs: int, disk: float) -> Estimate:
        flops = 2 * shape.params * rows * work.tokens_per_row
        memory = inference_gpu_memory(shape, score_batch * work.tokens_per_row, score_batch * work.completion_tokens)
        return Estimate(rule, jobs, 1, flops, hours(flops, 1, hardware), memory / GB, 2 * shape.params / GB,
                        disk / GB)

    validation = 2 * teacher.params * work.val_rows * work.tokens_per_row * checkpoints
    students = methods * replicates
    cache_disk = work.train_rows * work.completion_tokens * cache_bytes_per_token(top_k, teacher.vocab)
    return [
        train("sft_teacher", teacher, teacher_epochs, 1, sft_batch, sft_checkpointing,
              checkpoints * PUBLISHED_BYTES * teacher.params, validation),
        train("sft_student", student, student_epochs, 1, sft_batch, sft_checkpointing, PUBLISHED_BYTES * student.params),
        score("cache_logits", teacher, work.train_rows, checkpoints, cache_disk),
        score("estimate_subdomains", student, work.train_rows, 1, 0.0),
        train("distill", student, phases * epochs_per_phase, students, distill_batch, distill_checkpointing,
              PUBLISHED_BYTES * student.params),
        score("evaluate (T*, base teacher)", teacher, work.test_rows, 2, 0.0),
        score("evaluate (students)", student, work.test_rows, 1 + students, 0.0),
    ]


def requested(estimate: Estimate, floor_mem_mb: int) -> tuple[int, int]:
    """What one job of a rule asks its scheduler for on GPUs: host memory in MB (the estimate x
    ``MEMORY_MARGIN``, never below the rule's fixed ``floor_mem_mb``) and runtime in minutes
    (the FLOP estimate x ``RUNTIME_MARGIN`` + ``START_MINUTES``)."""
    mem_mb = max(floor_mem_mb, math.ceil(estimate.host_memory_gb * MEMORY_MARGIN * 1000))
    runtime = math.ceil(estimate.hours * 60 * RUNTIME_MARGIN + START_MINUTES)
    return mem_mb, runtime
