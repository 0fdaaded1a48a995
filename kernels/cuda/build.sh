#!/usr/bin/env bash
# Builds the CUDA kernels into build/cuda/:
#   libflash_attention_cuda.so   the C ABI of flash_attention.h (for tests,
#                                benchmarks, and any framework's glue)
#   flash_attention.o            the same, position-independent, for linking
#                                into the TensorFlow op library
#   sanitize_main                the compute-sanitizer driver (test/cuda)
# FA_CUDA_ARCHS: compute capabilities, e.g. "90" or "80 86 89 90" (default).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${FA_BUILD_DIR:-$root/build/cuda}"
mkdir -p "$out"
nvcc="${NVCC:-nvcc}"
gencode=()
for cc in ${FA_CUDA_ARCHS:-80 86 89 90}; do
  gencode+=("-gencode=arch=compute_${cc},code=sm_${cc}")
done
flags=(-O3 -std=c++17 "${gencode[@]}" -Xcompiler -fPIC -Xptxas -v)
src="$root/kernels/cuda/flash_attention.cu"
"$nvcc" "${flags[@]}" -c "$src" -o "$out/flash_attention.o" 2> "$out/ptxas.log" || {
  cat "$out/ptxas.log" >&2; exit 1; }
"$nvcc" -shared "${gencode[@]}" "$out/flash_attention.o" -o "$out/libflash_attention_cuda.so"
if [ "${FA_BUILD_SANITIZE:-0}" = 1 ]; then
  "$nvcc" -O1 -std=c++17 "${gencode[@]}" "$root/test/cuda/sanitize_main.cu" \
    "$out/flash_attention.o" -o "$out/sanitize_main"
fi
echo "built $out/libflash_attention_cuda.so (sm: ${FA_CUDA_ARCHS:-80 86 89 90})"
