"""Tokenizer loading and fingerprints (teacher and student must share one tokenizer)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from scd_pipeline.errors import ModelError


def tokenizer_fingerprint(tokenizer) -> dict:
    """Vocabulary size and a hash of the token→id map and special tokens: equal iff ids agree."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    payload = json.dumps({"vocab": vocab, "special": tokenizer.all_special_tokens},
                         ensure_ascii=False, separators=(",", ":"))
    return {"vocab_size": len(tokenizer), "sha256": hashlib.sha256(payload.encode("utf-8")).hexdigest()}


def load_tokenizer(path: str | Path):
    """Load a saved tokenizer directory, with a one-line error when it is missing or unreadable."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"tokenizer directory {path}: not found (run `scd-pipeline prepare-model "
                         "--role teacher` first, or pass --tokenizer PATH)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types here
        raise ModelError(f"tokenizer directory {path}: cannot be loaded ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(first, second, first_name: str = "teacher", second_name: str = "student") -> None:
    """Raise ModelError when two tokenizers would map text to different ids."""
    a, b = tokenizer_fingerprint(first), tokenizer_fingerprint(second)
    if a != b:
        raise ModelError(
            f"{first_name} and {second_name} tokenizers differ (vocab {a['vocab_size']} vs "
            f"{b['vocab_size']}, fingerprint {a['sha256'][:12]} vs {b['sha256'][:12]}): distillation "
            "needs one shared tokenizer; prepare the student from the teacher or a model of its family")


def check_data_tokenizer(data_dir: str | Path, tokenizer, model_path: str | Path) -> None:
    """Refuse a model whose tokenizer differs from the one the data manifest records."""
    manifest_file = Path(data_dir) / "manifest.json"
    if not manifest_file.is_file():
        return
    recorded = json.loads(manifest_file.read_text(encoding="utf-8")).get("tokenizer")
    if not isinstance(recorded, dict) or "sha256" not in recorded:
        return
    actual = tokenizer_fingerprint(tokenizer)
    if recorded["sha256"] != actual["sha256"]:
        raise ModelError(
            f"{model_path}: its tokenizer (vocab {actual['vocab_size']}, {actual['sha256'][:12]}) is "
            f"not the one {manifest_file} was prepared with (vocab {recorded.get('vocab_size')}, "
            f"{recorded['sha256'][:12]}); use a model of the same family or re-run prepare-data")
