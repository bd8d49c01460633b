#!/usr/bin/env bash
# One device session on the lent GPU machine: install, CUDA tests, NCCL parity, benchmarks.
# Usage (from the repository root, on the GPU machine): bash scripts/gpu_session.sh STEPS...
# STEPS: tests, check, distcheck, distcheck-masks, distcheck-zigzag, distcheck-pool, ring,
# ring-quick, bench, bench-padded, bench-pool, bench-pool-ring, bench-backward, profile,
# profile-host, ncu-mix, mix-variants.
# Logs and results go
# under $OUT (the device tool's output folder) or ./gpu-out.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
  tail -20 "$OUT/install.log"; exit 1; }
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(), "nccl", torch.cuda.nccl.version(), "cudnn", torch.backends.cudnn.version())'
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
status=0
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    tests) python3 -m pytest -q -rf --tb=short tests/test_gpu_cuda.py tests/test_gpu_kernels_cuda.py \
      tests/test_gpu_executor_cuda.py tests/test_gpu_key_padding.py tests/test_gpu_transformer.py \
      tests/test_gpu_dropout.py tests/test_gpu_pool.py \
      2>&1 | tee "$OUT/tests.log" | tail -15 ;;
    check) python3 -m ringsim.gpu.harness.check --out "$OUT" 2>&1 | tail -25 ;;
    distcheck)
      for dt in bfloat16 float16 float32; do
        python3 -m ringsim.gpu.harness.distcheck --world-size "$NGPU" --backend nccl --dtype $dt \
          2>&1 | tee "$OUT/distcheck_$dt.log" | tail -3
      done ;;
    distcheck-masks)
      for dt in bfloat16 float32; do
        python3 -m ringsim.gpu.harness.distcheck --world-size "$NGPU" --backend nccl --dtype $dt \
          --gqa --key-padding 2>&1 | tee "$OUT/distcheck_masks_$dt.log" | tail -3
      done ;;
    distcheck-zigzag)
      for dt in bfloat16 float32; do
        python3 -m ringsim.gpu.harness.distcheck --world-size "$NGPU" --backend nccl --dtype $dt \
          --layout zigzag 2>&1 | tee "$OUT/distcheck_zigzag_$dt.log" | tail -3
      done ;;
    distcheck-pool)
      for dt in bfloat16 float32; do
        python3 -m ringsim.gpu.harness.distcheck --world-size "$NGPU" --backend nccl --dtype $dt \
          --memory-pool 2>&1 | tee "$OUT/distcheck_pool_$dt.log" | tail -3
      done ;;
    ring-quick)
      torchrun --nproc-per-node "$NGPU" -m ringsim.gpu.harness.bench_ring --out "$OUT" \
        --lengths 262144 --budget 0.2 2>&1 | tail -40 ;;
    ring)
      torchrun --nproc-per-node "$NGPU" -m ringsim.gpu.harness.bench_ring --out "$OUT" \
        2>&1 | tee "$OUT/bench_ring.log" | tail -45 ;;
    bench) python3 -m ringsim.gpu.harness.bench --no-flex --out "$OUT" 2>&1 | tee "$OUT/bench.log" \
      | tail -30 ;;
    bench-padded) python3 -m ringsim.gpu.harness.bench --no-flex --no-naive --lengths 32768,262144 \
      --out "$OUT/padded" 2>&1 | tee "$OUT/bench_padded.log" | tail -30 ;;
    bench-pool) python3 -m ringsim.gpu.harness.bench_pool --out "$OUT/pool" 2>&1 \
      | tee "$OUT/bench_pool.log" | tail -12 ;;
    bench-pool-ring) torchrun --nproc-per-node "$NGPU" -m ringsim.gpu.harness.bench_pool --ring \
      --out "$OUT/pool" 2>&1 | tee "$OUT/bench_pool_ring.log" | tail -12 ;;
    mix-variants) python3 scripts/bench_mix_variants.py "$OUT/mix_variants.json" 2>&1 \
      | tee "$OUT/mix_variants.log" | tail -40 ;;
    bench-backward) python3 -m ringsim.gpu.harness.bench_backward --out "$OUT" 2>&1 \
      | tee "$OUT/bench_backward.log" | tail -30 ;;
    profile)
      for args in "" "--causal" "--backward" "--causal --backward"; do
        name=profile$(echo "$args" | tr -d ' -')
        python3 -m ringsim.gpu.harness.profile --seq-len 1048576 $args --rows 5 \
          --json "$OUT/$name.json" 2>&1 | grep -A12 "ms of CUDA time"
      done ;;
    profile-host)  # the host's side and the GPU's idle time too, where they weigh most
      mkdir -p "$OUT/host"
      for run in "32768" "32768 --causal" "65536 --causal" "131072" "131072 --causal" \
          "262144 --causal" "32768 --backward" "131072 --causal --backward"; do
        name=profile_$(echo "$run" | tr -d ' -')
        python3 -m ringsim.gpu.harness.profile --seq-len $run --rows 12 --host \
          --json "$OUT/host/$name.json" > "$OUT/host/$name.log" 2>&1
        grep -A12 "ms of CUDA time" "$OUT/host/$name.log" | grep -v "^caches\|^ *row\|^ *plans"
        grep -A9 "^host:" "$OUT/host/$name.log"
      done
      tar czf "$OUT/profile_host.tgz" -C "$OUT" host && rm -r "$OUT/host" ;;
    ncu-mix)  # the forward's mixing pass under Nsight Compute (hardware counters, clocks left alone)
      ncu --clock-control none -k regex:_mix_kernel -c 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --section LaunchStats --section SchedulerStats \
        python3 -m ringsim.gpu.harness.profile --seq-len 262144 --rows 3 2>&1 \
        | tee "$OUT/ncu_mix.log" | grep -v "^==PROF==" | tail -120 ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "step $step FAILED"; status=1; }
done
exit $status
