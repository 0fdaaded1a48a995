#!/usr/bin/env bash
# Checks the per-shader statistics tool end to end on a machine without a
# GPU (needs gcc, the Vulkan headers of libvulkan-dev and Debian's chromium
# for SwiftShader, as the tests use): builds the dump layer, the replay tool
# and a test-double layer (fake_executables_layer.c) that gives SwiftShader
# a made-up VK_KHR_pipeline_executable_properties; runs
# benchmarks/shader_stats.ts on Dawn + SwiftShader with the D=64 forward and
# backward plans; and checks that every pipeline got the fake statistics and
# instruction mix through the layer (in-process) and through the replay tool.
# About a minute on two cores. From the repository root:
#
#   bash benchmarks/shader_stats/selftest/selftest.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
here=benchmarks/shader_stats
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cflags=(-O2 -Wall -Werror)
layer_flags=(-shared -fPIC -fvisibility=hidden -Wl,-Bsymbolic)
gcc "${cflags[@]}" "${layer_flags[@]}" -o "$build/libVkLayer_tfjsfa_shader_stats.so" \
  "$here/dump_layer.c" -lpthread
gcc "${cflags[@]}" -o "$build/pipeline_stats" "$here/pipeline_stats.c" -ldl
gcc "${cflags[@]}" "${layer_flags[@]}" -o "$build/libfake_executables.so" \
  "$here/selftest/fake_executables_layer.c" -lpthread
cp "$here/VkLayer_tfjsfa_shader_stats.json" "$build/"
cat > "$build/fake_executables.json" <<'JSON'
{"file_format_version": "1.1.0", "layer": {"name": "VK_LAYER_TFJSFA_fake_executables",
 "type": "GLOBAL", "library_path": "./libfake_executables.so", "api_version": "1.3.0",
 "implementation_version": "1", "description": "test double (selftest.sh)"}}
JSON
banner="import {createRequire} from 'module'; const require = createRequire(import.meta.url);"
node_modules/.bin/esbuild benchmarks/shader_stats.ts --bundle --platform=node --format=esm \
  --target=node18 --main-fields=module,main --external:webgpu --log-level=warning \
  "--banner:js=$banner" --outfile=benchmarks/out/shader_stats.mjs
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
export VK_ICD_FILENAMES=/usr/lib/chromium/vk_swiftshader_icd.json
# The runner puts the dump layer first (nearest the application), above the fake.
VK_LAYER_PATH="$build" VK_INSTANCE_LAYERS=VK_LAYER_TFJSFA_fake_executables \
  node benchmarks/out/shader_stats.mjs --layer "$build" --out "$build/out" --dump "$build/dump" \
  --seq 64 --heads 2 \
  --variants "64:default;64:k2" --grad-variants "64:default" > "$build/table.md"
cat "$build/table.md"
fail() { echo "selftest: FAILED: $*" >&2; exit 1; }
# threads, regs, shared, stack, local, workgroups and warps per SM, then FFMA FMUL/FADD LDS
# LDS.128 STS BAR LDG STG INT MUFU.EX2 SHFL BRA instr
row='\| [0-9]+ \| 96 \| 49152 \| - \| 16 \| [0-9]+ \| [0-9]+ \| '
row+='2 \| 0 \| 1 \| 1 \| 1 \| 1 \| 1 \| 1 \| 2 \| 1 \| 0 \| 0 \| 13 \|'
# The statistics table comes first, then the SPIR-V table.
sed '/^SPIR-V as/q' "$build/table.md" > "$build/stats_table.md"
rows=$(grep -c '| pipeline-' "$build/stats_table.md" || true)
good=$(grep -cE -- "$row" "$build/stats_table.md" || true)
spirv_rows=$(sed -n '/^SPIR-V as/,$p' "$build/table.md" |
  grep -c '| pipeline-[0-9]* | [1-9]' || true)
[ "$spirv_rows" = "$rows" ] || fail "$spirv_rows of $rows pipelines have SPIR-V counts"
[ "$rows" -ge 6 ] || fail "expected >= 6 pipelines (fwd, split fwd, combine, 3 bwd): $rows"
[ "$good" = "$rows" ] || fail "$good of $rows rows have the fake statistics"
grep -q '^fwd D=64 causal plan .*: ok$' "$build/out/plans.txt" || fail "forward plan did not run"
grep -q '^fwd D=64 causal k2: ok$' "$build/out/plans.txt" || fail "forced split forward did not run"
grep -q '^fwdbwd D=64 causal bwd default: ok$' "$build/out/plans.txt" || fail "backward did not run"
ls "$build"/dump/module-*.spv >/dev/null || fail "no SPIR-V dumped"
# The replay tool on the same dumps, through the fake.
VK_LAYER_PATH="$build" VK_INSTANCE_LAYERS=VK_LAYER_TFJSFA_fake_executables \
  "$build/pipeline_stats" "$build/dump"
for f in "$build"/dump/pipeline-*.stats; do
  case $f in *.replay.stats) continue ;; esac
  r=${f%.stats}.replay.stats
  [ -f "$r" ] || fail "no replay of $f"
  grep -q $'^stat\t0\tRegister Count\t96\t' "$r" || fail "replay of $f lacks the statistics"
  grep -q $'^irline\t0\t0\t.*FFMA' "$r" || fail "replay of $f lacks the listing's head"
done
echo "selftest: ok ($rows pipelines, in-process and replayed)"
