#!/usr/bin/env bash
# Build the peers' own virtual environment (issue 7): kvpress 0.5.5 pins
# transformers < 5.3, and memsvc's venv has a newer one, so the peers live in
# benchmarks/peers/.venv-kvpress. Everything comes from PyPI. torch is held at
# 2.13.0 by a constraints file so that no dependency can pull another build
# (a CUDA torch is gigabytes). optimum-quanto backs transformers' QuantizedCache
# and compiles a C++ extension on first use (needs g++ and ninja). hqq backs
# QuantizedCache(backend="hqq") (pure PyTorch on CPU; its 3-bit packing fails
# there, see worker.py).
#
#   bash benchmarks/peers/setup.sh          # idempotent: does nothing when the venv is complete
#   PYTHON=python3.11 bash benchmarks/peers/setup.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-kvpress"
py="${PYTHON:-python3}"
stamp="$venv/.peers-ok"
pins=(torch==2.13.0 "transformers==5.2.*" kvpress==0.5.5 optimum-quanto==0.2.7 hqq==0.2.8.post1 ninja)

if [[ -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" ]]; then
    echo "peers: $venv is ready (${pins[*]})" >&2
    exit 0
fi
for tool in g++; do
    command -v "$tool" >/dev/null || { echo "peers: $tool is needed (optimum-quanto builds a C++ extension): apt-get install g++" >&2; exit 1; }
done
echo "peers: creating $venv" >&2
"$py" -m venv "$venv"
constraints="$venv/constraints.txt"
printf 'torch==2.13.0\n' > "$constraints"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q -c "$constraints")
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0
"${pip[@]}" "${pins[@]}"
# What came in, and a check that torch is still the one asked for.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, kvpress  # noqa: F401
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert transformers.__version__.startswith("5.2."), transformers.__version__
import hqq.core.quantize  # noqa: F401
for p in ("torch", "transformers", "kvpress", "optimum-quanto", "hqq"):
    print(f"peers: {p} {md.version(p)}")
PY
echo "${pins[*]}" > "$stamp"
