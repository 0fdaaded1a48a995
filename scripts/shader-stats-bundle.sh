#!/usr/bin/env bash
# Bundles the per-shader statistics tool (benchmarks/shader_stats.ts, the
# Vulkan layer and replay tool in benchmarks/shader_stats/) for a GPU machine:
# scripts/device-bundle.sh's folder plus shader_stats/ with the C sources,
# the Vulkan headers they need (Debian's libvulkan-dev; the GPU machine has
# only the loader), binaries built here as a fallback, and run.sh. On the GPU
# machine, from inside the folder, one command builds the layer and the tool
# with gcc, runs the plans and prints the table:
#
#   bash shader_stats/run.sh [--out DIR] [shader_stats.mjs options]
#
# Usage (from the repository root, after `npm ci`):
#
#   bash scripts/shader-stats-bundle.sh [--out DIR] [EXTRA_ENTRY.ts ...]
#
# docs/webgpu_tuning.md, "Per-shader statistics", says what the table means.
set -euo pipefail
out=.device-bundle
if [ "${1:-}" = --out ]; then out=$2; shift 2; fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/device-bundle.sh --out "$out" benchmarks/shader_stats.ts "$@"

cache=${DEVICE_BUNDLE_CACHE:-/tmp/tfjs-flash-attention-bundle-cache}
if ! ls "$cache"/vulkan-dev/libvulkan-dev_*.deb >/dev/null 2>&1; then
  mkdir -p "$cache/vulkan-dev" "$cache/apt-lists/partial"
  apt_opts="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64"
  apt_opts="$apt_opts -oDir::State::Lists=$cache/apt-lists"
  # shellcheck disable=SC2086
  apt-get $apt_opts update -qq
  # shellcheck disable=SC2086
  (cd "$cache/vulkan-dev" && apt-get $apt_opts download libvulkan-dev >/dev/null)
fi
tool="$out/shader_stats"
rm -rf "$tool" && mkdir -p "$tool/include" "$tool/prebuilt"
headers=$(mktemp -d)
dpkg -x "$cache"/vulkan-dev/libvulkan-dev_*.deb "$headers"
# vulkan_core.h includes the video codec headers of vk_video/.
mkdir -p "$tool/include/vulkan" "$tool/include/vk_video"
cp "$headers"/usr/include/vulkan/*.h "$tool/include/vulkan/"
cp "$headers"/usr/include/vk_video/*.h "$tool/include/vk_video/"
rm -rf "$headers"
cp benchmarks/shader_stats/*.c benchmarks/shader_stats/*.h benchmarks/shader_stats/*.json "$tool/"

cat > "$tool/build.sh" <<'EOF'
# Builds the layer and the replay tool into $1 (default /tmp/shader-stats-build).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build=${1:-/tmp/shader-stats-build}
mkdir -p "$build"
cflags=(-O2 -Wall -I "$here/include")
gcc "${cflags[@]}" -shared -fPIC -fvisibility=hidden -Wl,-Bsymbolic \
  -o "$build/libVkLayer_tfjsfa_shader_stats.so" "$here/dump_layer.c" -lpthread &&
  gcc "${cflags[@]}" -o "$build/pipeline_stats" "$here/pipeline_stats.c" -ldl
EOF
# Fallback binaries for a machine without gcc (same glibc era as the node binary).
if command -v gcc >/dev/null; then bash "$tool/build.sh" "$tool/prebuilt"; fi

cat > "$tool/run.sh" <<'EOF'
#!/usr/bin/env bash
# On the GPU machine, from the bundle folder: builds the layer and the replay
# tool (or takes prebuilt/), unpacks node and Dawn (env.sh), runs
# shader_stats.mjs with them and prints the table. Arguments go to
# shader_stats.mjs (default --out shader-stats).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build=/tmp/shader-stats-build
rm -rf "$build" && mkdir -p "$build"
if command -v gcc >/dev/null && bash "$here/build.sh" "$build"; then
  echo "shader_stats: built with $(gcc --version | head -1)"
else
  echo "shader_stats: no working gcc, using prebuilt/"
  cp "$here"/prebuilt/* "$build/"
fi
cp "$here/VkLayer_tfjsfa_shader_stats.json" "$build/"
# shellcheck disable=SC1091
source "$here/../env.sh"
run() { node "$here/../shader_stats.mjs" --layer "$build" --replay "$build/pipeline_stats" "$@"; }
if ! run "$@"; then
  # The capture changes Dawn's device and pipelines; without it the layer
  # only dumps, and the replay tool compiles the dumps on a device of its own.
  echo "shader_stats: failed; again with SHADER_STATS_CAPTURE=0 (dumps, then the replay tool)"
  SHADER_STATS_CAPTURE=0 run "$@"
fi
EOF
chmod +x "$tool/run.sh"
du -sh "$tool" | awk '{print "shader-stats-bundle: " $2 " holds " $1}'
