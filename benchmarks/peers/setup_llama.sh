#!/usr/bin/env bash
# Build llama-cpp-python from source (issue 24: llama.cpp as a peer row) in its own virtual environment,
# benchmarks/peers/.venv-llama. The sdist comes from PyPI and compiles llama.cpp with this machine's
# compiler (about 4 minutes on 2 cores here): built once, reused. Built for AVX2/AVX-512 without AMX: with
# -march=native this machine's CPU reports AMX, and the AMX kernels crash (SIGSEGV) in the first decode.
# CMAKE_ARGS overrides the flags.
#
#   bash benchmarks/peers/setup_llama.sh      # idempotent: does nothing when the venv is complete
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-llama"
py="${PYTHON:-python3}"
pin="llama-cpp-python==0.3.36"
stamp="$venv/.llama-ok"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$pin" ]]; then
    echo "llama: $venv is ready ($pin)" >&2
    exit 0
fi
for tool in g++ cmake; do
    command -v "$tool" >/dev/null || { echo "llama: $tool is needed to build $pin: apt-get install $tool" >&2; exit 1; }
done
echo "llama: creating $venv and building $pin from source (15-30 min)" >&2
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF}"
"$venv/bin/python" -m pip install --disable-pip-version-check -q --no-binary llama-cpp-python --no-cache-dir \
    --force-reinstall --no-deps "$pin"
"$venv/bin/python" -m pip install --disable-pip-version-check -q "$pin"  # its dependencies
"$venv/bin/python" - <<'PY'
import llama_cpp
print("llama:", llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())
PY
echo "$pin" > "$stamp"
