#!/usr/bin/env bash
# The GPU measurements and tests that CPU sessions cannot take, in stages that each fit one
# device-tool call (<= 10 minutes). Run from the repository root on the GPU machine:
#
#   bash benchmarks/gpu_checks.sh tests      # CUDA tests: kernels at real shapes, async refresh, stress
#   bash benchmarks/gpu_checks.sh kernel     # Triton vs PyTorch decode attention (+ launch tuning)
#   bash benchmarks/gpu_checks.sh bench-a    # Llama-3.1-8B shapes, 8K and 32K, batch 1
#   bash benchmarks/gpu_checks.sh bench-b    # 64K and 128K, batch 1
#   bash benchmarks/gpu_checks.sh maxbatch   # largest batch that fits at 128K, tokens/s per method
#   bash benchmarks/gpu_checks.sh decode     # issue 15 in one call (<= 10 min): CUDA decode-step tests
#                                            # (device path == CPU path, no host reads, async == sync
#                                            # refresh), then Llama-3.1-8B shapes at 32K and 128K, batch 1
#   bash benchmarks/gpu_checks.sh compiled   # issue 15: StaticCache + torch.compile against FullKV, SnapKV and
#                                            # HeteroCache eager and with CUDA graphs (reduce-overhead), 32K, 128K
#   bash benchmarks/gpu_checks.sh dynamic    # issue 16 in one call (<= 10 min): the CUDA tests of Quest,
#                                            # OmniKV (offload through the pinned context's device alias)
#                                            # and ShadowKV, then the three at 32K and 128K, batch 1
#
# Results go under ${OUT:-runs/gpu}/; commit the JSON under benchmarks/results/ (it names the GPU).
set -euo pipefail
export PYTHONPATH=src
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
BENCH=(python -m heterocache.cli bench --model random:meta-llama/Llama-3.1-8B-Instruct --device cuda
       --methods dynamic,fullkv,heterocache,snapkv --budgets 0.1,0.25,0.5 --new-tokens 32 --warmup 3)
case "${1:?stage: tests|kernel|bench-a|bench-b|maxbatch|decode|compiled|dynamic}" in
  tests)    python -m pytest -q -rs tests/attention/test_kernels_gpu.py tests/attention/test_kernels_triton_interp.py \
              tests/attention/test_kernels_ragged_torch.py tests/methods/test_hetero_runtime.py tests/bench/test_bench_cli.py \
              2>&1 | tee "$OUT/gpu_tests.txt" ;;
  kernel)   python benchmarks/kernel_bench.py --tune --out "$OUT/kernel.json" ;;
  bench-a)  "${BENCH[@]}" --lengths 8192,32768 --out "$OUT/bench_8k_32k" ;;
  bench-b)  "${BENCH[@]}" --lengths 65536,131072 --out "$OUT/bench_64k_128k" ;;
  maxbatch) "${BENCH[@]}" --budgets 0.25 --lengths 131072 --max-batch 131072 --new-tokens 8 \
              --out "$OUT/maxbatch_128k" ;;
  decode)   # Most important first, each result written as soon as it exists.
            python -m pytest -q -rs tests/engine/test_decode_step.py tests/attention/test_kernels_gpu.py \
              "tests/methods/test_hetero_runtime.py::test_gpu_async_refresh_gives_the_tokens_of_the_synchronous_path" \
              "tests/methods/test_omnikv.py::test_offload_on_cuda_reads_the_pinned_context_from_the_device_and_keeps_the_tokens" \
              2>&1 | tee "$OUT/decode_tests.txt"
            timeout 240 "${BENCH[@]}" --methods dynamic,fullkv,snapkv,heterocache --budgets 0.25 \
              --lengths 32768 --out "$OUT/decode_32k" || true
            timeout 240 "${BENCH[@]}" --methods dynamic,fullkv,snapkv,heterocache --budgets 0.25 \
              --lengths 131072 --out "$OUT/decode_128k" || true ;;
  compiled) timeout 560 python benchmarks/compiled_decode.py --model random:meta-llama/Llama-3.1-8B-Instruct \
              --device cuda --lengths 32768 131072 --methods static,dynamic,fullkv,snapkv,heterocache \
              --out "$OUT/compiled_decode.json" || true ;;
  dynamic)  python -m pytest -q -rs tests/methods/test_quest.py tests/methods/test_omnikv.py tests/methods/test_shadowkv.py \
              tests/engine/test_device_placement.py 2>&1 | tee "$OUT/dynamic_tests.txt"
            timeout 200 "${BENCH[@]}" --methods dynamic,quest,omnikv,shadowkv,heterocache --budgets 0.25 \
              --lengths 32768 --out "$OUT/dynamic_32k" || true
            timeout 300 "${BENCH[@]}" --methods dynamic,quest,omnikv,shadowkv,heterocache --budgets 0.25 \
              --lengths 131072 --out "$OUT/dynamic_128k" || true ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
