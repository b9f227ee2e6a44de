#!/usr/bin/env bash
# make venv: the venv at $VENV (default .venv) holding exactly requirements.lock, plus memsvc itself
# (editable). An existing venv is kept only if it was made from the same lock, pyproject.toml and Python,
# and every locked version is installed in it (checked each time, so a stale venv left by an earlier run,
# or a lock changed since, never passes for the lock); otherwise it is made again from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=requirements.lock
[ -f "$LOCK" ] || { echo "venv: $LOCK is missing: run \`make lock\`" >&2; exit 2; }
want=$( { cat "$LOCK" pyproject.toml; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)

# pip freeze against the lock, build tags (+cpu, +cu128) ignored: "" when every locked version is installed
missing() {
  "$VENV/bin/python" -m pip freeze --all 2>/dev/null | sed -E 's/\+[^ ]*$//' > "$VENV/.freeze"
  grep -v '^#' "$LOCK" | sed -E 's/\+[^ ]*$//' | grep -Fvx -f "$VENV/.freeze" || true
}

if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.installed" 2>/dev/null)" = "$want" ]; then
  gone=$(missing)
  if [ -z "$gone" ] && "$VENV/bin/python" -c 'import memsvc.kernels.codec' 2>/dev/null; then
    exit 0
  fi
  echo "venv: $VENV does not hold what $LOCK says (${gone:-memsvc not importable}); making it again" >&2
elif [ -e "$VENV" ]; then
  echo "venv: $VENV was made from another $LOCK, pyproject.toml or Python; making it again" >&2
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -r "$LOCK"
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
gone=$(missing)
if [ -n "$gone" ]; then
  echo "venv: installing $LOCK left these out: $gone" >&2
  exit 1
fi
"$VENV/bin/python" -m pip check
echo "$want" > "$VENV/.installed"
