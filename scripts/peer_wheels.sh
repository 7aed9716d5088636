#!/usr/bin/env bash
# Wheels of the peers the benchmarks compare against (POT, GeomLoss, KeOps), for a GPU machine
# that reaches no package registry: download them here, let the folder travel with the working
# tree, and install them there into a folder of their own (scripts/gpu_check.sh does).
#
#   scripts/peer_wheels.sh download [DIR]          DIR: .peer-wheels (git-ignored)
#   scripts/peer_wheels.sh install DIR TARGET      pip install --target TARGET, no index, no deps
#
# The versions are pinned in benchmarks/peers.txt. PEER_PYTHON_VERSION (default 3.12, the GPU
# image's python3) picks the binary wheels (POT's); pykeops and keopscore publish only sources,
# pure Python, so their wheels are built here. Their requirements (numpy, scipy, torch,
# pybind11) are in the GPU image; --no-deps keeps pip from looking for them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PINS=benchmarks/peers.txt

download() {
  local dir=${1:-.peer-wheels} version=${PEER_PYTHON_VERSION:-3.12}
  local tmp="$dir.partial"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  local binary=() source=()
  while read -r pin _; do
    case $pin in '' | '#'*) continue ;; pykeops* | keopscore*) source+=("$pin") ;; *) binary+=("$pin") ;; esac
  done <"$PINS"
  local platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
  done
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp "${platforms[@]}" -d "$tmp" "${binary[@]}"
  "$PYTHON" -m pip wheel --quiet --no-deps -w "$tmp" "${source[@]}"
  # Replace the folder only once every wheel is there: a failed download leaves the old one.
  rm -rf "$dir"
  mv "$tmp" "$dir"
  echo "peer wheels for python $version in $dir:"
  ls -1 "$dir"
}

install() {
  local dir=${1:?usage: peer_wheels.sh install DIR TARGET} target=${2:?usage: peer_wheels.sh install DIR TARGET}
  local wheels=("$dir"/*.whl)
  [ -e "${wheels[0]}" ] || { echo "peer_wheels.sh: no wheels in $dir" >&2; exit 1; }
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$target" "${wheels[@]}"
}

case ${1:-} in
download) download "${2:-}" ;;
install) install "${2:-}" "${3:-}" ;;
*) echo "usage: $0 download [DIR] | install DIR TARGET" >&2; exit 2 ;;
esac
