#!/usr/bin/env bash
# The GPU check in one command, within 8 minutes (about 6 on an H200): see benchmarks/gpu_check.py.
#   benchmarks/gpu_check.sh TOKENIZER_DIR [WHEEL_DIR]
# TOKENIZER_DIR: any saved Hugging Face tokenizer (the check's models are random-weight, built on the spot).
# WHEEL_DIR (optional): wheels of packages the machine lacks, installed into a private target first. The
# checks need only torch, triton and transformers (and what they bring): their models are safetensors, which
# load without gguf or the server's packages (tests/entrypoints/test_llm.py checks that).
#   benchmarks/gpu_check.sh --prepare [DIR]   (here, before the device run: see below)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  # The embedded default model's tokenizer saved into DIR (default .gpu-check/tokenizer, git-ignored, so the
  # run must carry it), and the device call that runs the check.
  out=${2:-.gpu-check/tokenizer}
  python3 -c 'import sys
from tokenmill.loader.source import default_model_source
from tokenmill.tokenizer import load_tokenizer
load_tokenizer(default_model_source()).save_pretrained(sys.argv[1])' "$out"
  case "$out" in
    /*) echo "device run: copy $out into a git-ignored folder of the repo and carry that folder" ;;
    *) echo "device run: command 'benchmarks/gpu_check.sh $out', carry ['${out%%/*}'], timeout_s 500" ;;
  esac
  exit 0
fi
tokenizer=${1:?usage: benchmarks/gpu_check.sh TOKENIZER_DIR [WHEEL_DIR]}
if [ -n "${2:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tokenmill-site "$2"/*.whl
  export PYTHONPATH=/tmp/tokenmill-site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# Kernels and fidelity first, the longest (transformers generate on the workload) last.
# --time-limit: transformers' generate, last, is cut off there with the ratio's lower bound and the table
# printed, inside the 8 minutes (timeout: the hard stop).
exec timeout 480 python3 benchmarks/gpu_check.py --tokenizer "$tokenizer" --only 21453 --time-limit 460
