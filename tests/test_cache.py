"""Teacher-logit cache: exact reconstruction at k = vocab, tail mass, per-sample scores, Parquet
layout, refusal of stale or foreign caches, atomic writes, and the cache-logits / cache-info CLI.

Every test runs on a results tree built here: a 14-sample split with the docs/ARTIFACTS.md columns
(byte-level tokenizer), two tiny random Llama "teacher checkpoints" saved with save_pretrained, and
their checkpoints.json. ``build_tiny_task`` is also used by tests/test_subdomains.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.engine import logit_cache, scoring
from scd_pipeline.engine.batching import completion_logits, frame_batch, read_split
from scd_pipeline.engine.config import load_config, task_dir
from scd_pipeline.engine.io import sha256_file, write_json
from scd_pipeline.engine.models import load_model
from scd_pipeline.engine.splits import split_schema
from scd_pipeline.engine.tiny import byte_level_tokenizer, tiny_llama
from scd_pipeline.engine.tokenization import tokenizer_fingerprint
from scd_pipeline.errors import ConfigError, DataError
from scd_pipeline.math.metrics import exact_f1_document
from scd_pipeline.stages import cache_logits as cache

VOCAB = 259  # byte_level_tokenizer(): 256 bytes + 3 ChatML specials
N_SAMPLES = 14


def tiny_checkpoint(tokenizer, seed: int, num_layers: int = 2):
    return tiny_llama(tokenizer, hidden_size=32, num_layers=num_layers, num_heads=2,
                      intermediate_size=64, seed=seed)


def save_model(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def split_rows(tokenizer) -> list[dict]:
    """Choice samples (letter + end of turn) and every fifth a list sample (JSON list + end)."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    for i in range(N_SAMPLES):
        kind = "list" if i % 5 == 4 else "choice"
        question = f"Q{i}: " + "abc"[i % 3] * (i % 6 + 1)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        answer = "ABCD"[i % 4] if kind == "choice" else json.dumps(["x" * (i % 3 + 1), "yz"])
        rows.append({
            "sample_id": f"demo-{i:05d}", "tag": "even" if i % 2 == 0 else "odd", "kind": kind,
            "question": question, "choices": list("ABCD") if kind == "choice" else [],
            "answer": answer, "label": "ABCD".index(answer) if kind == "choice" else -1,
            "prompt": prompt, "prompt_ids": tokenizer.encode(prompt),
            "completion_ids": tokenizer.encode(answer) + [end], "truncated": False, "weight": 1.0})
    return rows


def build_tiny_task(root: Path, n_checkpoints: int = 2, best: int = 2) -> dict:
    """Write {root}/demo/{data,teacher,student_sft} as the earlier stages would; return the config."""
    tokenizer = byte_level_tokenizer()
    task_path = root / "demo"
    data_dir = task_path / "data"
    data_dir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(split_rows(tokenizer), schema=split_schema()), data_dir / "train.parquet")
    write_json(data_dir / "manifest.json", {"dataset_fingerprint": sha256_file(data_dir / "train.parquet"),
                                            "tokenizer": tokenizer_fingerprint(tokenizer)})
    entries = []
    for index in range(1, n_checkpoints + 1):
        save_model(tiny_checkpoint(tokenizer, seed=index), tokenizer, task_path / "teacher" / f"ckpt-{index}")
        entries.append({"index": index, "path": f"ckpt-{index}", "step": 10 * index, "epoch": index / 2,
                        "val_loss": 1.0 / index, "val_metric": 0.5, "best": index == best})
    write_json(task_path / "teacher" / "checkpoints.json",
               {"metric": "accuracy", "best_index": best, "checkpoints": entries})
    save_model(tiny_checkpoint(tokenizer, seed=100, num_layers=1), tokenizer, task_path / "student_sft")
    return tiny_config(root)


def tiny_config(root: Path, **overrides) -> dict:
    return load_config(None, {"results_dir": str(root), "task": "demo", "cache.batch_size": 4,
                              "cache.rows_per_group": 5, "subdomains.probe_size": 6, **overrides})


@pytest.fixture(scope="module")
def task_root(tmp_path_factory) -> Path:
    """A task tree with fp16 k=8 caches of both checkpoints (never modified: copy it to mutate)."""
    root = tmp_path_factory.mktemp("results")
    config = build_tiny_task(root)
    for index in (1, 2):
        cache.cache_logits(tiny_config(root, **{"cache.top_k": 8}), index)
    assert config["cache"]["dtype"] == "fp16"
    return root


@pytest.fixture
def task_copy(task_root, tmp_path) -> Path:
    """A private copy of the cached task tree (mtimes preserved, so weights still match)."""
    shutil.copytree(task_root, tmp_path / "results", copy_function=shutil.copy2)
    return tmp_path / "results"


def dense_logprobs(root: Path, checkpoint: int, sample_ids: list[str]) -> tuple[torch.Tensor, object]:
    """log_softmax of the checkpoint's full logits at the completion positions of these samples."""
    frame = read_split(root / "demo" / "data" / "train.parquet")
    model, tokenizer = load_model(root / "demo" / "teacher" / f"ckpt-{checkpoint}", device="cpu")
    rows = [int(np.flatnonzero(frame["sample_id"] == s)[0]) for s in sample_ids]
    batch = frame_batch(frame, rows, tokenizer.pad_token_id)
    with torch.no_grad():
        return torch.log_softmax(completion_logits(model, batch), -1), batch


# --------------------------------------------------------------------------- fidelity


def test_cache_with_k_equal_to_vocab_reproduces_the_full_distribution_in_student_order(task_copy):
    config = tiny_config(task_copy, **{"cache.top_k": VOCAB, "cache.dtype": "fp32"})
    cache.cache_logits(config, 1)
    # A student batch in an order unrelated to the file's (length-sorted) row order.
    ids = ["demo-00009", "demo-00000", "demo-00004", "demo-00013", "demo-00006"]
    dense, batch = dense_logprobs(task_copy, 1, ids)
    reader = logit_cache.open_task_cache(config, 1, byte_level_tokenizer())
    counts = torch.bincount(batch.token_sample).tolist()
    target = reader.targets(ids, completion_lengths=counts)
    assert target.ids.shape == (int(batch.predict_mask.sum()), VOCAB) and target.vocab_size == VOCAB
    torch.testing.assert_close(target.dense_logprobs(), dense, rtol=0, atol=1e-6)
    assert torch.isneginf(target.tail_logmass).all()  # nothing outside a full top-k


def test_tail_logmass_is_the_log_of_the_mass_outside_the_top_k(task_copy):
    config = tiny_config(task_copy, **{"cache.top_k": 5, "cache.dtype": "fp32"})
    cache.cache_logits(config, 2)
    ids = ["demo-00001", "demo-00004", "demo-00012"]
    dense, _ = dense_logprobs(task_copy, 2, ids)
    target = logit_cache.open_task_cache(config, 2).targets(ids)
    top_logprobs, top_ids = dense.topk(5, dim=-1)
    assert torch.equal(target.ids, top_ids)
    torch.testing.assert_close(target.logprobs, top_logprobs, rtol=0, atol=1e-6)
    outside = 1.0 - top_logprobs.double().exp().sum(-1)
    torch.testing.assert_close(target.tail_logmass.double(), outside.log(), rtol=0, atol=1e-5)
    total = torch.cat([target.logprobs, target.tail_logmass[:, None]], -1).logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-5)


def test_fp16_cache_rounds_log_probs_to_half_precision(task_root):
    ids = ["demo-00003", "demo-00008"]
    dense, _ = dense_logprobs(task_root, 1, ids)
    target = logit_cache.open_task_cache(tiny_config(task_root, **{"cache.top_k": 8}), 1).targets(ids)
    exact = dense.gather(1, target.ids)
    torch.testing.assert_close(target.logprobs, exact.half().float(), rtol=0, atol=0)
    assert (target.logprobs - exact).abs().max() < 5e-3


def test_int8_cache_stores_codes_on_a_tenth_of_a_nat_and_reads_them_back(task_root, task_copy):
    config = tiny_config(task_copy, **{"cache.top_k": 8, "cache.dtype": "int8"})
    meta = cache.cache_logits(config, 1)
    assert (meta["dtype"], meta["logprob_step"], meta["format_version"]) == ("int8", 0.1, 3)
    stored = pq.read_table(logit_cache.cache_path(task_copy / "demo", 1)).column("topk_logprobs")
    assert stored.type.value_type.value_type == pa.uint8()
    ids = ["demo-00003", "demo-00008", "demo-00004"]
    dense, _ = dense_logprobs(task_copy, 1, ids)
    target = logit_cache.open_task_cache(config, 1).targets(ids)
    exact = dense.gather(1, target.ids)
    # code = round(-logprob / 0.1), read back as -0.1 * code: within half a step, on the grid
    assert (target.logprobs - exact).abs().max() <= 0.05 + 1e-6
    codes = -target.logprobs / 0.1
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    # the same ids and tail as the fp16 cache of this checkpoint, in a smaller file
    fp16_config = tiny_config(task_root, **{"cache.top_k": 8})
    fp16 = logit_cache.open_task_cache(fp16_config, 1).targets(ids)
    assert torch.equal(target.ids, fp16.ids) and torch.equal(target.tail_logmass, fp16.tail_logmass)
    fp16_bytes = json.loads(logit_cache.sidecar_path(logit_cache.cache_path(task_root / "demo", 1)).read_text())["file_bytes"]
    assert meta["file_bytes"] < fp16_bytes


def test_int8_codes_by_hand():
    values = np.array([0.0, -0.04, -0.05001, -1.26, -25.5, -40.0, -np.inf], dtype=np.float32)
    codes = logit_cache.encode_logprobs(values, "int8")
    assert codes.dtype == np.uint8 and codes.tolist() == [0, 0, 1, 13, 255, 255, 255]
    decoded = logit_cache.decode_logprobs(codes, {"dtype": "int8", "logprob_step": 0.1})
    np.testing.assert_allclose(decoded, [0.0, 0.0, -0.1, -1.3, -25.5, -25.5, -25.5], atol=1e-6)


def test_refuses_a_cache_of_a_newer_format(task_copy):
    config = tiny_config(task_copy, **{"cache.top_k": 8})
    sidecar = logit_cache.sidecar_path(logit_cache.cache_path(task_copy / "demo", 1))
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "format_version": logit_cache.FORMAT_VERSION + 1}))
    with pytest.raises(DataError, match="format version"):
        logit_cache.open_task_cache(config, 1)


def greedy_list(model, tokenizer, prompt_ids, stop_ids) -> list[str]:
    """The list a model writes after one unpadded prompt (greedy), parsed; [] when malformed."""
    with torch.no_grad():
        output = model.generate(input_ids=torch.tensor([list(prompt_ids)]), max_new_tokens=64, do_sample=False,
                                eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    tokens = output[0, len(prompt_ids):].tolist()
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return scoring.parse_list_output(tokenizer.decode(tokens[:cut], skip_special_tokens=True)) or []


def test_per_sample_gold_nll_and_score_are_the_task_metric_of_each_sample(task_root):
    reader = logit_cache.open_task_cache(tiny_config(task_root, **{"cache.top_k": 8}), 2)
    stats = reader.stats().set_index("sample_id")
    frame = read_split(task_root / "demo" / "data" / "train.parquet").set_index("sample_id")
    ids = list(frame.index)
    dense, batch = dense_logprobs(task_root, 2, ids)
    model, tokenizer = load_model(task_root / "demo" / "teacher" / "ckpt-2", device="cpu")
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    letters = [tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"]
    gold = dense.gather(1, batch.target_ids[:, None]).squeeze(1)
    start, scores = 0, []
    for sample_id in ids:
        n = len(frame.at[sample_id, "completion_ids"])
        span = slice(start, start + n)
        assert stats.at[sample_id, "n_tokens"] == n
        assert stats.at[sample_id, "nll_sum"] == pytest.approx(-float(gold[span].sum()), abs=1e-5)
        assert stats.at[sample_id, "nll_mean"] == pytest.approx(-float(gold[span].mean()), abs=1e-5)
        answer = frame.at[sample_id, "answer"]
        if frame.at[sample_id, "kind"] == "choice":  # the best-ranked option letter is the gold one
            expected = float("ABCD"[int(dense[start, letters].argmax())] == answer)
        else:  # exact-match F1 of the greedily written list
            written = greedy_list(model, tokenizer, frame.at[sample_id, "prompt_ids"], stop_ids)
            expected = exact_f1_document(json.loads(answer), written)
        assert stats.at[sample_id, "score"] == pytest.approx(expected), sample_id
        scores.append(expected)
        start += n
    assert 0 < sum(scores) < len(scores)  # both outcomes occur, so the check can fail


def test_scoring_a_split_gives_the_numbers_the_cache_stores(task_root):
    frame = read_split(task_root / "demo" / "data" / "train.parquet")
    model, tokenizer = load_model(task_root / "demo" / "teacher" / "ckpt-1", device="cpu")
    scored = scoring.predict_split(model, tokenizer, frame, batch_size=3, max_new_tokens=64)
    assert scored["sample_id"].tolist() == frame["sample_id"].tolist()
    stored = logit_cache.open_task_cache(tiny_config(task_root, **{"cache.top_k": 8}), 1).stats()
    merged = scored.merge(stored, on="sample_id", suffixes=("", "_cache"))
    np.testing.assert_allclose(-merged["gold_logprob"] / merged["gold_tokens"], merged["nll_mean"], atol=1e-5)
    np.testing.assert_allclose(merged["score"], merged["score_cache"])


# --------------------------------------------------------------------------- layout and sidecar


def test_parquet_layout_types_row_groups_and_sidecar(task_root):
    path = task_root / "demo" / "logits" / "ckpt-1.parquet"
    frame = pd.read_parquet(path)
    assert list(frame.columns) == ["sample_id", "n_tokens", "nll_sum", "nll_mean", "score",
                                   "topk_ids", "topk_logprobs", "tail_logmass"]
    assert frame["score"].dtype == np.float32
    assert len(frame) == N_SAMPLES
    first = frame.iloc[0]
    assert len(first["topk_ids"]) == first["n_tokens"] == len(first["tail_logmass"])
    assert first["topk_ids"][0].dtype == np.uint16 and len(first["topk_ids"][0]) == 8
    assert first["topk_logprobs"][0].dtype == np.float16
    assert pq.ParquetFile(path).num_row_groups == 3  # 14 samples, 5 per group
    meta = json.loads((path.parent / "ckpt-1.meta.json").read_text())
    tokens = int(frame["n_tokens"].sum())
    assert meta["tokens"] == tokens and meta["rows"] == N_SAMPLES
    assert meta["bytes_per_token"] == pytest.approx(path.stat().st_size / tokens)
    assert (meta["k"], meta["dtype"], meta["id_dtype"], meta["temperature"], meta["vocab_size"]) == \
        (8, "fp16", "uint16", 1.0, VOCAB)
    assert meta["tokenizer"] == tokenizer_fingerprint(byte_level_tokenizer())
    manifest = json.loads((task_root / "demo" / "data" / "manifest.json").read_text())
    assert meta["dataset_fingerprint"] == manifest["dataset_fingerprint"]
    weights = task_root / "demo" / "teacher" / "ckpt-1" / "model.safetensors"
    assert meta["checkpoint"]["index"] == 1
    assert meta["checkpoint"]["weights"][0]["sha256"] == sha256_file(weights)
    assert meta["tokens_per_second"] > 0 and meta["created"] and meta["split"] == "train"


def test_id_dtype_is_the_smallest_that_holds_the_vocabulary():
    assert logit_cache.id_dtype_for(259) == np.uint16
    assert logit_cache.id_dtype_for(65536) == np.uint16  # ids 0..65535
    assert logit_cache.id_dtype_for(65537) == np.int32
    assert logit_cache.id_dtype_for(151_936) == np.int32


def test_dataset_fingerprint_falls_back_to_the_split_hash_without_a_manifest(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"split bytes")
    assert logit_cache.dataset_fingerprint_for(tmp_path, "train") == (sha256_file(tmp_path / "train.parquet"), "split_sha256")
    write_json(tmp_path / "manifest.json", {"dataset_fingerprint": "abc"})
    assert logit_cache.dataset_fingerprint_for(tmp_path, "train") == ("abc", "manifest")


# --------------------------------------------------------------------------- refusals


def refusal(config: dict, checkpoint: int = 1, tokenizer=None) -> str:
    with pytest.raises(DataError) as caught:
        logit_cache.open_task_cache(config, checkpoint, tokenizer)
    message = str(caught.value)
    assert "\n" not in message and f"ckpt-{checkpoint}.parquet" in message
    return message


def test_refuses_a_cache_of_other_data(task_copy):
    manifest = task_copy / "demo" / "data" / "manifest.json"
    write_json(manifest, {**json.loads(manifest.read_text()), "dataset_fingerprint": "0" * 64})
    assert "dataset_fingerprint" in refusal(tiny_config(task_copy))


def test_refuses_a_cache_of_another_tokenizer(task_copy):
    other = byte_level_tokenizer()
    other.add_tokens(["<extra>"])
    assert "tokenizer" in refusal(tiny_config(task_copy), tokenizer=other)
    logit_cache.open_task_cache(tiny_config(task_copy), 1, byte_level_tokenizer())  # the same one passes


def test_refuses_a_cache_of_a_retrained_checkpoint_but_accepts_a_copied_one(task_copy):
    weights = task_copy / "demo" / "teacher" / "ckpt-1" / "model.safetensors"
    os.utime(weights, ns=(1, 1))  # a copy: new mtime, same bytes -> hash decides, accepted
    logit_cache.open_task_cache(tiny_config(task_copy), 1)
    tokenizer = byte_level_tokenizer()
    save_model(tiny_checkpoint(tokenizer, seed=7), tokenizer, weights.parent)  # same shapes, new weights
    assert "checkpoint" in refusal(tiny_config(task_copy))


def test_refuses_a_cache_without_its_sidecar(task_copy):
    (task_copy / "demo" / "logits" / "ckpt-1.meta.json").unlink()
    assert "sidecar" in refusal(tiny_config(task_copy))


def test_refuses_a_sidecar_written_for_another_cache_file(task_copy):
    logits = task_copy / "demo" / "logits"
    shutil.copy(logits / "ckpt-2.meta.json", logits / "ckpt-1.meta.json")
    assert "sidecar" in refusal(tiny_config(task_copy))


def test_refuses_a_truncated_cache(task_copy):
    path = task_copy / "demo" / "logits" / "ckpt-1.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "truncated or corrupt" in refusal(tiny_config(task_copy))


@pytest.mark.parametrize("field,value", [("dtype", "int8"), ("k", 16), ("temperature", 2.0),
                                         ("format_version", logit_cache.FORMAT_VERSION)])
def test_refuses_a_sidecar_that_disagrees_with_the_file_naming_the_field(task_copy, field, value):
    sidecar = logit_cache.sidecar_path(logit_cache.cache_path(task_copy / "demo", 1))
    meta = json.loads(sidecar.read_text())
    if field == "format_version":  # the sidecar says what the reader wants, the file does not
        path = logit_cache.cache_path(task_copy / "demo", 1)
        table = pq.read_table(path)
        footer = json.loads(table.schema.metadata[logit_cache.PARQUET_META_KEY])
        footer["format_version"] = 2
        pq.write_table(table.replace_schema_metadata({logit_cache.PARQUET_META_KEY: json.dumps(footer)}), path)
        sidecar.write_text(json.dumps({**meta, "file_bytes": path.stat().st_size}))
    else:
        sidecar.write_text(json.dumps({**meta, field: value}))
    message = refusal(tiny_config(task_copy, **({"cache.temperature": 2.0} if field == "temperature" else {})))
    assert f"says {field} = " in message and "the file says" in message
    info = logit_cache.cache_info(logit_cache.cache_path(task_copy / "demo", 1))
    assert info["sidecar_mismatch"] == [field] and info["k"] == 8 and info["dtype"] == "fp16"


def test_refuses_a_file_whose_columns_are_not_the_declared_dtype(task_copy):
    path = logit_cache.cache_path(task_copy / "demo", 1)
    table = pq.read_table(path)
    index = table.schema.get_field_index("topk_logprobs")
    as_fp32 = table.column(index).cast(pa.list_(pa.list_(pa.float32())))
    table = table.set_column(index, pa.field("topk_logprobs", as_fp32.type), as_fp32)
    pq.write_table(table, path)
    sidecar = logit_cache.sidecar_path(path)
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "file_bytes": path.stat().st_size}))
    assert "column topk_logprobs" in refusal(tiny_config(task_copy))


def test_refuses_a_cache_made_at_another_temperature(task_copy):
    assert "temperature" in refusal(tiny_config(task_copy, **{"cache.temperature": 2.0}))


def test_targets_check_the_student_batch_token_counts_and_ids(task_root):
    reader = logit_cache.open_task_cache(tiny_config(task_root), 1)
    with pytest.raises(DataError, match="stale"):
        reader.targets(["demo-00000"], completion_lengths=[5])
    with pytest.raises(DataError, match="not in the cache"):
        reader.targets(["demo-99999"])


# --------------------------------------------------------------------------- the decoded copy

def parquet_targets(path: Path, sample_ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored top-k ids, log-probs and tails of these samples, read with pandas."""
    frame = pd.read_parquet(path).set_index("sample_id").loc[sample_ids]
    ids = np.concatenate([np.stack(list(lists)) for lists in frame["topk_ids"]])
    logprobs = np.concatenate([np.stack(list(lists)) for lists in frame["topk_logprobs"]]).astype(np.float32)
    tails = np.concatenate(list(frame["tail_logmass"]))
    return ids, logprobs, tails


def test_targets_are_read_from_the_decoded_copy_in_any_batch_order(task_root, monkeypatch):
    """Once opened, no Parquet row group is decompressed again: every batch, in any order, is
    copied from the memory-mapped decoded arrays and equals what the file stores."""
    path = task_root / "demo" / "logits" / "ckpt-1.parquet"
    assert (task_root / "demo" / "logits" / "ckpt-1.decoded" / "identity.json").is_file()  # made by cache-logits
    reader = logit_cache.open_task_cache(tiny_config(task_root), 1)

    def no_row_group_reads(*args, **kwargs):
        raise AssertionError("a row group was decoded again")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", no_row_group_reads)
    order = np.random.default_rng(0).permutation(reader.sample_ids).tolist()
    for batch in (order[:3], order[3:9], order[9:], order[::-1]):
        target = reader.targets(batch)
        ids, logprobs, tails = parquet_targets(path, batch)
        assert np.array_equal(target.ids.numpy(), ids.astype(np.int64))
        assert np.array_equal(target.logprobs.numpy(), logprobs)
        assert np.array_equal(target.tail_logmass.numpy(), tails)


def test_a_stale_or_torn_decoded_copy_is_rebuilt(task_copy):
    config = tiny_config(task_copy)
    folder = task_copy / "demo" / "logits" / "ckpt-1.decoded"
    expected = logit_cache.open_task_cache(config, 1).targets(["demo-00003", "demo-00010"])
    uid = json.loads((task_copy / "demo" / "logits" / "ckpt-1.meta.json").read_text())["uid"]
    for damage in ("torn", "stale"):
        if damage == "torn":
            (folder / "ids.npy").write_bytes((folder / "ids.npy").read_bytes()[:100])
        else:
            write_json(folder / "identity.json", {"uid": "another write", "rows": 0, "tokens": 0})
        target = logit_cache.open_task_cache(config, 1).targets(["demo-00003", "demo-00010"])
        assert json.loads((folder / "identity.json").read_text())["uid"] == uid
        for name in ("ids", "logprobs", "tail_logmass"):
            assert torch.equal(getattr(target, name), getattr(expected, name)), damage
    assert not list(folder.parent.glob(".ckpt-1.decoded.*"))  # no staging folder left


# --------------------------------------------------------------------------- atomic writing


def test_an_interrupted_write_leaves_nothing_under_the_final_name(task_copy, monkeypatch):
    logits = task_copy / "demo" / "logits"
    partial_sizes = []
    real = scoring.completion_logits
    calls = {"n": 0}

    def crash_on_third_batch(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            partial_sizes.extend(p.stat().st_size for p in logits.glob(".ckpt-1.parquet.*.tmp"))
            raise RuntimeError("simulated crash")
        return real(model, batch)

    monkeypatch.setattr(scoring, "completion_logits", crash_on_third_batch)
    config = tiny_config(task_copy, **{"cache.batch_size": 3, "cache.rows_per_group": 2})
    with pytest.raises(RuntimeError, match="simulated crash"):
        cache.cache_logits(config, 1)
    assert partial_sizes and partial_sizes[0] > 0  # row groups had been streamed to the temp file
    assert not (logits / "ckpt-1.parquet").exists() and not (logits / "ckpt-1.meta.json").exists()
    assert not list(logits.glob(".ckpt-1.parquet.*"))  # temp file removed
    assert not (logits / "ckpt-1.decoded").exists()  # the old cache's decoded copy went with it
    assert (logits / "ckpt-2.parquet").exists()  # other checkpoints untouched


def test_top_k_beyond_the_vocabulary_is_a_config_error(task_copy):
    with pytest.raises(ConfigError, match="cache.top_k"):
        cache.cache_logits(tiny_config(task_copy, **{"cache.top_k": VOCAB + 1}), 1)


# --------------------------------------------------------------------------- CLI


def test_cli_cache_logits_and_cache_info(task_copy):
    runner = CliRunner()
    result = runner.invoke(app, ["cache-logits", "--checkpoint", "2", "--results-dir", str(task_copy),
                                 "--task", "demo", "--top-k", "16", "--dtype", "fp32", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "k=16 fp32" in result.output
    path = task_dir(tiny_config(task_copy)) / "logits" / "ckpt-2.parquet"
    info = runner.invoke(app, ["cache-info", str(path)])
    assert info.exit_code == 0, info.output
    assert f"rows: {N_SAMPLES}" in info.output and "k: 16" in info.output and "dtype: fp32" in info.output
    as_json = json.loads(runner.invoke(app, ["cache-info", str(path), "--json"]).output)
    assert as_json["bytes_per_token"] == pytest.approx(path.stat().st_size / as_json["tokens"])
    assert as_json["sidecar"]["k"] == 16
    missing = runner.invoke(app, ["cache-logits", "--checkpoint", "9", "--results-dir", str(task_copy)])
    assert missing.exit_code == 2 and "error: --checkpoint 9: no such teacher checkpoint" in missing.output
