"""Custom tasks from a Hugging Face ``datasets`` source (built here, nothing touches the network):
a ``save_to_disk`` folder and a hub id in the local cache give the same splits as the same rows
in files; prepared splits open with ``datasets.load_dataset("parquet", ...)`` (docs/ARTIFACTS.md).
"""

from __future__ import annotations

import socket
from pathlib import Path

import datasets
import pandas as pd
import pytest

from scd_pipeline.engine.config import load_config
from scd_pipeline.errors import DataError
from scd_pipeline.stages.prepare_data import prepare_data

FIELDS = {"id": "uid", "question": "text", "answer": "gold", "tag": "group", "options": ["yes", "no"]}


def rows(prefix: str, n: int) -> list[dict]:
    return [{"uid": f"{prefix}{i}", "text": f"Is {prefix}{i} even?", "yes": "even", "no": "odd",
             "gold": "A" if i % 2 == 0 else "B", "group": "parity"} for i in range(n)]


def custom_config(results: Path, **custom) -> dict:
    block = {"kind": "choice", "fields": FIELDS, **custom}
    return load_config(None, {"task": "custom", "results_dir": str(results), "data.custom": block,
                              "data.val_fraction": 0.2})


def read_splits(out: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(out / f"{name}.parquet") for name in ("train", "val", "test")}


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection is refused and fails the test afterwards (even one the library
    swallows); the hub's offline mode is switched off, so only the loader can switch it on."""
    import huggingface_hub.constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield
    assert attempts == [], f"connections attempted: {attempts}"


def test_save_to_disk_folder_gives_the_same_splits_as_files(tmp_path, tiny_tokenizer_dir, no_network):
    train, test = rows("tr", 20), rows("te", 4)
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(folder))
    from_dataset = read_splits(prepare_data(custom_config(tmp_path / "a", dataset=str(folder)), tiny_tokenizer_dir))
    (tmp_path / "in").mkdir()
    pd.DataFrame(train).to_parquet(tmp_path / "in" / "train.parquet")
    pd.DataFrame(test).to_parquet(tmp_path / "in" / "test.parquet")
    from_files = read_splits(prepare_data(custom_config(tmp_path / "b", train=str(tmp_path / "in" / "train.parquet"),
                                                        test=str(tmp_path / "in" / "test.parquet")),
                                          tiny_tokenizer_dir))
    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(from_dataset[name], from_files[name])
    assert from_dataset["test"].sample_id.tolist() == ["custom-te0", "custom-te1", "custom-te2", "custom-te3"]
    manifest = pd.read_json(tmp_path / "a" / "custom" / "data" / "manifest.json", typ="series")
    assert [(s["role"], s["split"], s["rows"]) for s in manifest["sources"]] == [("train", "train", 20),
                                                                               ("test", "test", 4)]


def cache_hub_dataset(cache: Path, repo_id: str, splits: dict[str, list[dict]]) -> None:
    """Lay ``splits`` out in ``cache`` as ``datasets.load_dataset(repo_id)`` leaves a hub dataset
    (``{namespace}___{name}/default/0.0.0/{hash}/{name}-{split}.arrow``), without the hub."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = repo_id.split("/")
    cache.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, records in splits.items():
        files[split] = str(cache.parent / f"{split}.parquet")
        pd.DataFrame(records).to_parquet(files[split])
    builder = Parquet(cache_dir=str(cache), dataset_name=name, config_name="default", config_id="default",
                      hash="0123456789abcdef", data_files=files)
    builder.download_and_prepare()
    (cache / name).rename(cache / f"{namespace}___{name}")


def test_hub_id_is_read_from_the_local_cache_with_named_splits(tmp_path, tiny_tokenizer_dir, no_network,
                                                               monkeypatch):
    cache = tmp_path / "hf" / "datasets"
    cache_hub_dataset(cache, "clinic/parity", {"training": rows("tr", 20), "held_out": rows("va", 5),
                                               "evaluation": rows("te", 4)})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    config = custom_config(tmp_path / "results", dataset="clinic/parity", train="training", val="held_out",
                           test="evaluation")
    splits = read_splits(prepare_data(config, tiny_tokenizer_dir))
    assert {name: len(frame) for name, frame in splits.items()} == {"train": 20, "val": 5, "test": 4}
    assert splits["val"].sample_id.tolist()[:2] == ["custom-va0", "custom-va1"]
    assert splits["test"].question[1] == ("Is te1 even?\n\nA. even\nB. odd\n\n"
                                          "Answer with the letter of the correct option (A or B).")
    assert datasets.config.HF_HUB_OFFLINE is False  # the loader's offline switch is undone


def test_uncached_hub_id_and_missing_split_are_one_line_errors(tmp_path, tiny_tokenizer_dir, no_network,
                                                               monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(DataError, match=r"'nobody/nothing' is neither a save_to_disk folder nor a dataset "
                                        r"in the local Hugging Face cache") as caught:
        prepare_data(custom_config(tmp_path / "r1", dataset="nobody/nothing"), tiny_tokenizer_dir)
    assert "\n" not in str(caught.value)
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("tr", 6))}).save_to_disk(str(folder))
    with pytest.raises(DataError, match=r"data\.custom\.test: dataset .*saved has no split 'test' \(it has train\)"):
        prepare_data(custom_config(tmp_path / "r2", dataset=str(folder)), tiny_tokenizer_dir)
    bad = tmp_path / "bad"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{**r, "gold": "Z"} for r in rows("tr", 3)]),
                          "test": datasets.Dataset.from_list(rows("te", 2))}).save_to_disk(str(bad))
    with pytest.raises(DataError, match=r"bad \[split train\]: row 1, column 'gold': answer 'Z' is not one"):
        prepare_data(custom_config(tmp_path / "r3", dataset=str(bad)), tiny_tokenizer_dir)


def test_prepared_splits_open_with_load_dataset_parquet(tmp_path, tiny_tokenizer_dir, no_network,
                                                        monkeypatch):
    """The recipe of docs/ARTIFACTS.md (offline, as HF_HUB_OFFLINE=1 would set it)."""
    import huggingface_hub.constants

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows("tr", 10)),
                          "test": datasets.Dataset.from_list(rows("te", 3))}).save_to_disk(str(folder))
    out = prepare_data(custom_config(tmp_path / "results", dataset=str(folder)), tiny_tokenizer_dir)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    splits = datasets.load_dataset("parquet", data_files={name: str(out / f"{name}.parquet")
                                                          for name in ("train", "val", "test")},
                                   cache_dir=str(tmp_path / "cache"))
    assert {name: splits[name].num_rows for name in splits} == {"train": 8, "val": 2, "test": 3}
    first = splits["test"][0]
    assert first["sample_id"] == "custom-te0" and first["choices"] == ["A", "B"]
    assert first["completion_ids"] == pd.read_parquet(out / "test.parquet").completion_ids[0].tolist()
