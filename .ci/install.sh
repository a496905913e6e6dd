#!/usr/bin/env bash
# Installs everything tfllm needs on a fresh Debian/Ubuntu machine with Python >= 3.10:
# the system packages Horovod's build needs, a virtual environment, the pinned Python
# dependencies, Horovod 0.28.1 built from source (TensorFlow + Gloo + MPI), and tfllm itself.
#
# Idempotent: with everything in place it finishes in seconds. The Makefile, CI and both
# Dockerfiles run this one script, so there is exactly one install recipe.
#
#   bash .ci/install.sh                    # CPU build (Gloo + MPI) into ./.venv
#   bash .ci/install.sh --gpu              # also NCCL GPU ops (needs nvcc / a CUDA toolkit)
#   bash .ci/install.sh --gpu-wheel DIR    # compile-check only: build the NCCL wheel into DIR
#
# Environment: TFLLM_VENV (default ./.venv; "system" installs into the current Python),
# PYTHON (default python3), CUDA_HOME (default /usr/local/cuda), HOROVOD_BUILD_CUDA_CC_LIST (90).
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TFLLM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
MODE=cpu
WHEEL_DIR=""
case "${1:-}" in
  "") ;;
  --gpu) MODE=gpu ;;
  --gpu-wheel) MODE=gpu-wheel; WHEEL_DIR="${2:?--gpu-wheel needs an output directory}" ;;
  *) echo "install.sh: unknown argument '$1' (expected --gpu or --gpu-wheel DIR)" >&2; exit 2 ;;
esac

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }
START=$SECONDS

# ---------------------------------------------------------------- system packages
# libtcmalloc-minimal4: the pipelines run on tcmalloc (tfllm/malloc.py), 1.3-1.5x faster on CPU.
APT_PACKAGES=(cmake g++ make libopenmpi-dev openmpi-bin libhighwayhash-dev libfarmhash-dev libtcmalloc-minimal4)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "missing system packages ${missing[*]} and no apt-get to install them"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "missing system packages ${missing[*]}; run as root or install sudo"
    SUDO=sudo
  fi
  say "installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die "apt-get install ${missing[*]} failed"
fi
command -v mpirun >/dev/null || die "mpirun not on PATH after installing openmpi-bin"

# ---------------------------------------------------------------- virtual environment
if [ "$VENV" = system ]; then
  PY="$(command -v "$PYTHON")" || die "no $PYTHON on PATH"
  BIN="$(dirname "$PY")"
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv' failed (on Debian: apt-get install python3-venv)"
  fi
  PY="$VENV/bin/python"
  BIN="$VENV/bin"
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "Python >= 3.10 required, got $("$PY" -V)"
export PATH="$BIN:$PATH"
PIP=("$PY" -m pip --disable-pip-version-check -q)
# Machines with local package mirrors configured but absent make pip warn once per package.
pip_quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2); }

# The stamp records what was installed: same inputs and a working Horovod means nothing to do.
STAMP_FILE="$("$PY" -c 'import sys; print(sys.prefix)')/.tfllm-install-stamp"
STAMP="$(cat "$ROOT/setup.cfg" "$ROOT/.ci/install.sh" "$ROOT/.ci/include/tensorflow/compiler/xla/client/xla_builder.h" \
  | sha256sum | cut -c1-16)-$MODE"

horovod_ok() {
  local out
  out="$("$BIN/horovodrun" --check-build 2>/dev/null)" || return 1
  for fw in TensorFlow MPI Gloo; do grep -q "\[X\] $fw" <<<"$out" || return 1; done
  if [ "$MODE" = gpu ]; then grep -q "\[X\] NCCL" <<<"$out" || return 1; fi
}

# `horovodrun --check-build` imports every framework (~30 s); the fast path only confirms the
# stamp, written after a full check passed, and that the compiled library is still there.
horovod_lib_present() {
  "$PY" -c 'import importlib.util as u, pathlib as p, sys; s = u.find_spec("horovod")
sys.exit(0 if s and list(p.Path(s.origin).parent.glob("tensorflow/mpi_lib*.so")) else 1)'
}
if [ "$MODE" != gpu-wheel ] && [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$STAMP" ] && horovod_lib_present; then
  say "up to date ($VENV) in $((SECONDS - START))s"
  exit 0
fi

# ---------------------------------------------------------------- Python dependencies
# Everything from setup.cfg except Horovod, which must be built against the installed TensorFlow.
mapfile -t REQUIREMENTS < <("$PY" - "$ROOT/setup.cfg" <<'EOF'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
for extra in ("test", "k8s", "bench"):
    reqs += [r.strip() for r in cfg["options.extras_require"][extra].splitlines() if r.strip()]
print("\n".join(r for r in reqs if not r.lower().startswith("horovod")))
EOF
)
# On GPU machines TensorFlow brings its own CUDA 12 libraries (cuDNN, cuBLAS, NCCL...).
if [ "$MODE" = gpu ]; then REQUIREMENTS=("${REQUIREMENTS[@]/#tensorflow==/tensorflow[and-cuda]==}"); fi
say "installing Python dependencies"
pip_quiet "${PIP[@]}" install --upgrade pip setuptools wheel packaging || die "pip could not upgrade pip/setuptools/wheel"
# Horovod's own runtime needs, installed up front because its build runs without isolation.
pip_quiet "${PIP[@]}" install cloudpickle psutil pyyaml cffi "${REQUIREMENTS[@]}" || die "pip install of the pinned dependencies failed"

# ---------------------------------------------------------------- Horovod from source
export CPLUS_INCLUDE_PATH="$ROOT/.ci/include${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
HOROVOD_PIP_ARGS=(--no-build-isolation)
if [ "$MODE" != cpu ]; then
  CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  [ -x "$CUDA_HOME/bin/nvcc" ] || die "GPU build needs nvcc at \$CUDA_HOME/bin/nvcc ($CUDA_HOME)"
  pip_quiet "${PIP[@]}" install "nvidia-nccl-cu12" || die "pip install nvidia-nccl-cu12 failed"
  NCCL_HOME="$("$PY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])')"
  # The wheel ships only the versioned soname; CMake's FindNCCL looks for libnccl.so.
  [ -e "$NCCL_HOME/lib/libnccl.so" ] || ln -s libnccl.so.2 "$NCCL_HOME/lib/libnccl.so"
  export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_HOME="$NCCL_HOME" HOROVOD_NCCL_LINK=SHARED
  export HOROVOD_CUDA_HOME="$CUDA_HOME" HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-90}"
  export PATH="$CUDA_HOME/bin:$PATH"
  # A cached CPU wheel must never satisfy a GPU build.
  HOROVOD_PIP_ARGS+=(--no-cache-dir)
fi

if [ "$MODE" = gpu-wheel ]; then
  mkdir -p "$WHEEL_DIR"
  say "compiling Horovod 0.28.1 with NCCL into $WHEEL_DIR (compile check, nothing is installed)"
  pip_quiet "${PIP[@]}" wheel --no-deps "${HOROVOD_PIP_ARGS[@]}" -w "$WHEEL_DIR" horovod==0.28.1 \
    || die "Horovod NCCL build failed"
  ls "$WHEEL_DIR"/horovod-0.28.1-*.whl >/dev/null || die "no Horovod wheel in $WHEEL_DIR"
  # Proof that the NCCL ops were compiled in, not silently left out: the TF op library links NCCL.
  "$PY" - "$WHEEL_DIR" <<'EOF' || die "the Horovod wheel's TensorFlow library does not link NCCL"
import glob, sys, zipfile
wheel = sorted(glob.glob(f"{sys.argv[1]}/horovod-0.28.1-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    lib = next(n for n in z.namelist() if n.startswith("horovod/tensorflow/mpi_lib") and n.endswith(".so"))
    blob = z.read(lib)
sys.exit(0 if b"libnccl.so" in blob and b"ncclAllReduce" in blob else 1)
EOF
  say "GPU wheel built in $((SECONDS - START))s: $(ls "$WHEEL_DIR"/horovod-0.28.1-*.whl)"
  exit 0
fi

if ! horovod_ok; then
  say "building Horovod 0.28.1 from source ($MODE; a few minutes)"
  "${PIP[@]}" uninstall -y horovod >/dev/null 2>&1 || true
  pip_quiet "${PIP[@]}" install "${HOROVOD_PIP_ARGS[@]}" horovod==0.28.1 || die "Horovod build failed (see the compiler output above)"
  horovod_ok || { "$BIN/horovodrun" --check-build >&2 || true; die "Horovod installed but --check-build lacks TensorFlow, MPI or Gloo"; }
fi

# ---------------------------------------------------------------- tfllm itself
pip_quiet "${PIP[@]}" install --no-build-isolation --no-deps -e "$ROOT" || die "pip install -e $ROOT failed"
"$PY" -c 'import tfllm, keras, keras_hub, tensorflow_text, horovod.tensorflow' || die "import check failed"
"$BIN/horovodrun" --check-build | sed -n '/Available Frameworks/,$p'
echo "$STAMP" >"$STAMP_FILE"
say "done in $((SECONDS - START))s ($VENV)"
