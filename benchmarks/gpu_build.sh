# Sourced by benchmarks/gpu_suite.sh and benchmarks/gpu_demo.sh (bash, from the repo root, with
# $PY set): the build settings of a GPU machine, the stamp that lets a later call on the same
# warm machine skip the build, and py60.
#
# CUDA_HOME: /usr/local/cuda, else wherever nvcc is. TORCH_CUDA_ARCH_LIST, when unset: the first
# GPU's compute capability from nvidia-smi, +PTX (half the device code of 8.0;9.0+PTX to build),
# 8.0;9.0+PTX where nvidia-smi cannot tell. MAX_JOBS: every core. CC/CXX: kept, unless $CXX links
# libstdc++ statically (the H200 image sets CC/CXX to such an /opt/gcc, whose build crashed at its
# first error message and which setup.py refuses): then the system's gcc/g++ where it links it as
# a shared library.
if [[ -z "${CUDA_HOME:-}" ]]; then
  CUDA_HOME=/usr/local/cuda
  [[ -x $CUDA_HOME/bin/nvcc ]] || CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")"
fi
export CUDA_HOME
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  # (a missing or failing nvidia-smi reads as no answer, under the callers' set -e -o pipefail too)
  CAP="$({ nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true; } | head -1 | tr -d ' \r')"
  if [[ $CAP =~ ^[0-9]+\.[0-9]+$ ]]; then
    TORCH_CUDA_ARCH_LIST="$CAP+PTX"
  else
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"
  fi
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# How C++ compiler $1 (words: "ccache g++" too) links libstdc++: "shared", "static" (ldd shows
# none in a tiny shared object that formats a number), or "fail" (it could not build that; left
# for setup.py to report).
libstdcxx_link() {
  local dir how=fail cxx
  read -ra cxx <<<"$1"
  dir="$(mktemp -d)"
  printf '#include <sstream>\n#include <string>\nstd::string f(long i) { std::ostringstream s; s << i; return s.str(); }\n' >"$dir/s.cpp"
  if "${cxx[@]}" -shared -fPIC "$dir/s.cpp" -o "$dir/s.so" 2>/dev/null; then
    if ldd "$dir/s.so" | grep -q 'libstdc++'; then how=shared; else how=static; fi
  fi
  rm -rf "$dir"
  echo "$how"
}
if [[ "$(libstdcxx_link "${CXX:-c++}")" == static && -x /usr/bin/gcc &&
  "$(libstdcxx_link /usr/bin/g++)" == shared ]]; then
  echo "gpu_build.sh: ${CXX:-c++} links libstdc++ statically; building with /usr/bin/gcc and /usr/bin/g++" >&2
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
# The sources' hash, stamped after a build (gpu_build_stamp).
SOURCES_HASH="$(find csrc setup.py cast_ext/_build.py -type f | sort | xargs sha256sum | sha256sum | cut -c1-16)"
BUILD_STAMP=build/gpu_build.stamp

# $PY with a 60 s limit: a Python step outside the timed stages (a hung CUDA start cannot eat
# the device call).
py60() { timeout -s INT --kill-after=5 60 "$PY" "$@"; }

# True when an earlier call built these sources and cast_ext imports with its CUDA kernels.
gpu_build_current() {
  [[ -f $BUILD_STAMP && "$(cat "$BUILD_STAMP")" == "$SOURCES_HASH" ]] &&
    py60 -c "import cast_ext, sys; sys.exit(not cast_ext.cuda_kernels_available())" 2>/dev/null
}

gpu_build_stamp() {
  mkdir -p build && echo "$SOURCES_HASH" >"$BUILD_STAMP"
}
