#!/usr/bin/env bash
# Bundles benchmark (or test) entry points into one self-contained folder for
# a Linux x64 GPU machine that has a GPU driver but no Node.js: the entries
# bundled by esbuild, this machine's node binary, Dawn's native module (the
# `webgpu` package) and the Vulkan loader packages. Copy the folder to the
# GPU machine and run, from inside it:
#
#   source env.sh && node attention.mjs --help
#
# Usage (from the repository root, after `npm ci`):
#
#   bash scripts/device-bundle.sh [--out DIR] ENTRY.ts [ENTRY.ts ...]
#
# DIR defaults to .device-bundle; the Python anchors in benchmarks/*.py are
# copied in too, so PyTorch can be measured from the same folder.
set -euo pipefail
out=.device-bundle
if [ "${1:-}" = --out ]; then out=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: $0 [--out DIR] ENTRY.ts [ENTRY.ts ...]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ -d node_modules/webgpu ] || { echo "device-bundle: run npm ci first" >&2; exit 2; }
cache=${DEVICE_BUNDLE_CACHE:-/tmp/tfjs-flash-attention-bundle-cache}
mkdir -p "$out" "$cache"

# node itself: the GPU machine may have none.
[ -s "$cache/node.xz" ] || xz -T2 -6 -c "$(readlink -f "$(command -v node)")" > "$cache/node.xz"
cp "$cache/node.xz" "$out/node.xz"

# Dawn needs libvulkan (and the GL dispatch libraries the NVIDIA ICD loads).
if ! ls "$cache"/debs/libvulkan1_*.deb >/dev/null 2>&1; then
  mkdir -p "$cache/debs" "$cache/apt-lists/partial"
  apt_opts="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=$cache/apt-lists"
  # shellcheck disable=SC2086
  apt-get $apt_opts update -qq
  # shellcheck disable=SC2086
  (cd "$cache/debs" && apt-get $apt_opts download libvulkan1 libglvnd0 libegl1 libgl1 libglx0 libopengl0 libgles2 >/dev/null)
fi
mkdir -p "$out/debs" && cp "$cache"/debs/*.deb "$out/debs/"

# Dawn's Node binding, x64 Linux only.
dawn_dir="$out/node_modules/webgpu/dist/linux-x64"
rm -rf "$out/node_modules" && mkdir -p "$dawn_dir"
cp node_modules/webgpu/package.json node_modules/webgpu/index.js "$out/node_modules/webgpu/"
xz -T2 -3 -c node_modules/webgpu/dist/linux-x64/dawn.node > "$dawn_dir/dawn.node.xz"
for dep in debug ms; do
  if [ -d "node_modules/$dep" ]; then cp -r "node_modules/$dep" "$out/node_modules/"; fi
done

for entry in "$@"; do
  node_modules/.bin/esbuild "$entry" --bundle --platform=node --format=esm \
    --target=node18 --main-fields=module,main --external:webgpu --log-level=warning \
    "--banner:js=import {createRequire} from 'module'; const require = createRequire(import.meta.url);" \
    --outfile="$out/$(basename "${entry%.*}").mjs"
done
cp benchmarks/*.py "$out/"

cat > "$out/env.sh" <<'EOF'
# Sourced on the GPU machine: unpacks node, Dawn and the Vulkan loader once,
# and points Vulkan at the NVIDIA driver where one is installed.
bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for deb in "$bundle"/debs/*.deb; do dpkg -x "$deb" /; done
ldconfig
mkdir -p /tmp/bundle-node
[ -x /tmp/bundle-node/node ] || { xz -dc "$bundle/node.xz" > /tmp/bundle-node/node; chmod +x /tmp/bundle-node/node; }
dawn="$bundle/node_modules/webgpu/dist/linux-x64"
[ -f "$dawn/dawn.node" ] || xz -dc "$dawn/dawn.node.xz" > "$dawn/dawn.node"
export PATH=/tmp/bundle-node:$PATH XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp} NODE_PATH="$bundle/node_modules"
nvidia_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f "$nvidia_icd" ]; then
  export VK_DRIVER_FILES=$nvidia_icd
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
echo "bundle: node $(node --version)"
EOF
du -sh "$out" | awk '{print "device-bundle: " $2 " holds " $1}'
