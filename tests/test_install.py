"""A non-editable install finds its defaults: built as a wheel, installed into a folder of its own,
run from an empty folder that is not the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tracked_copy(destination: Path) -> Path:
    """The checkout's tracked files (links kept as links): the wheel is built from the sources, as
    in a fresh clone, never from a stale build/ folder that a checkout happens to hold."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source, copy = REPO / name, destination / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree, not yet committed
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            copy.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, copy)
    return destination


def test_a_wheel_install_runs_from_an_empty_folder(tmp_path):
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    work.mkdir()
    source = tracked_copy(tmp_path / "source")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("scd_pipeline-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "scd_pipeline", *args], cwd=work, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    located = subprocess.run([sys.executable, "-c", "import scd_pipeline; print(scd_pipeline.__file__)"],
                             cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert located.startswith(str(target))  # the installed copy, not this checkout
    assert "prepare-data" in run("--help")
    assert "wrote config.yaml" in run("init")
    written = yaml.safe_load((work / "config.yaml").read_text())
    assert written == yaml.safe_load((REPO / "config.yaml").read_text())
    assert "# " in (work / "config.yaml").read_text()  # the comments come along
    run("prepare-model", "--role", "teacher", "--source", "tiny:llama")
    run("prepare-data", "--task", "demo", "--set", "data.demo.n_examples=60", "--set", "data.demo.test_size=8")
    assert (work / "results" / "demo" / "data" / "train.parquet").is_file()
    refused = subprocess.run([sys.executable, "-m", "scd_pipeline", "init"], cwd=work, env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "already exists" in refused.stderr


def test_the_packaged_defaults_are_the_files_snakemake_reads():
    from scd_pipeline.engine.config import DEFAULT_CONFIG, SCHEMA_PATH

    assert DEFAULT_CONFIG.resolve() == (REPO / "config.yaml").resolve()
    assert SCHEMA_PATH.resolve() == (REPO / "workflow" / "schemas" / "config.schema.yaml").resolve()
