#!/usr/bin/env bash
# One GPU-machine session for issue 6, run from a copy of the repository
# root: build kernels/cuda for sm_90, check every option against the float64
# reference, compute-sanitizer (memcheck, racecheck) on small shapes, then
# the benchmark (MODE=quick: 3 shapes; MODE=full: the whole table).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
FA_CUDA_ARCHS=90 FA_BUILD_SANITIZE=1 bash kernels/cuda/build.sh || exit 1
grep -E "registers|spill" build/cuda/ptxas.log | paste - - | sed -E 's/ptxas info *: //g' | cut -c1-160 > "$OUT/ptxas.txt"
echo "build: $(( $(date +%s) - t0 )) s"
# The TensorFlow op library against our C-API header and the kernels (no
# libtensorflow here: its TF_* symbols stay undefined, resolved at load).
nvcc -O2 -std=c++17 -shared -Xcompiler -fPIC -gencode=arch=compute_90,code=sm_90 \
  kernels/tensorflow/flash_attention_op.cc build/cuda/flash_attention.o -o build/cuda/libtfjs_flash_attention_ops.so \
  && echo "op library linked; undefined TF_ symbols: $(nm -D --undefined-only build/cuda/libtfjs_flash_attention_ops.so | grep -c ' TF_')"
if [ "${CHECK:-1}" = 1 ]; then
  (cd test/cuda && FA_LIB=../../build/cuda/libflash_attention_cuda.so python3 check_kernels.py) 2>&1 | tee "$OUT/check.txt"
  echo "check: $(( $(date +%s) - t0 )) s"
  compute-sanitizer --tool memcheck --leak-check full --error-exitcode 3 build/cuda/sanitize_main > "$OUT/memcheck.txt" 2>&1; echo "memcheck exit $?" | tee -a "$OUT/memcheck.txt"
  compute-sanitizer --tool racecheck --error-exitcode 3 build/cuda/sanitize_main > "$OUT/racecheck.txt" 2>&1; echo "racecheck exit $?" | tee -a "$OUT/racecheck.txt"
  tail -n 3 "$OUT/memcheck.txt" "$OUT/racecheck.txt"
  echo "sanitize: $(( $(date +%s) - t0 )) s"
fi
FA_LIB=build/cuda/libflash_attention_cuda.so python3 benchmarks/cuda_bench.py $([ "${MODE:-quick}" = quick ] && echo --quick) --out "$OUT/bench.md" 2>&1 | tail -30
echo "total: $(( $(date +%s) - t0 )) s"
cat "$OUT/ptxas.txt"
