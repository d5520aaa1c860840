#!/usr/bin/env bash
# The compatibility subset (pytest -m compat) in an A1111-like and a Forge-like environment.
# Each venv gets only the HOST's packages at the host's pins; then sdtune's own install.py runs in
# it exactly as the WebUI would run it, installing what is missing without touching the pins.
# uv builds the venvs (torch is given as the local CPU wheel's path, so uv can never pick a CUDA
# build); install.py itself uses pip, as in the WebUI.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 UV_PYTHON_DOWNLOADS=never PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-$(command -v python3.11)}
TORCH_WHL=${TORCH_WHL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -n1)}
ROOT=.ci-venvs
[ -n "$TORCH_WHL" ] || { echo "compat: no local CPU torch wheel in /opt/wheels" >&2; exit 1; }
mkdir -p "$ROOT"
[ -x "$ROOT/uv/bin/uv" ] || { "$PY" -m venv "$ROOT/uv" && "$ROOT/uv/bin/pip" install -q uv; }
UV="$ROOT/uv/bin/uv"

host_packages() {
  case $1 in
    a1111) echo "gradio==3.41.2 fastapi==0.94.0 transformers==4.30.2 accelerate==0.21.0 numpy==1.26.2 \
                 Pillow==9.5.0 safetensors==0.4.2 httpx==0.24.1 httpcore==0.15.0 huggingface_hub<1.0 pyyaml" ;;
    forge) echo "gradio==4.40.0 huggingface_hub<1.0 transformers==4.46.1 diffusers==0.31.0 peft==0.13.2 \
                 accelerate==0.31.0 fastapi==0.112.2 pydantic==2.10.6 numpy==1.26.2 safetensors==0.4.2 \
                 Pillow==9.5.0 httpx==0.24.1 pyyaml" ;;
  esac
}

prepare_host() {
  local host=$1 start venv
  start=$(date +%s)
  venv="$ROOT/$host"
  rm -rf "$venv"
  "$UV" venv -q --seed --python "$PY" "$venv"
  # shellcheck disable=SC2046
  "$UV" pip install -q --python "$venv/bin/python" "$TORCH_WHL" $(host_packages "$host") pytest
  "$UV" pip install -q --python "$venv/bin/python" --no-deps open-clip-torch==2.20.0
  echo "compat[$host]: host environment ready in $(( $(date +%s) - start )) s"
}

test_host() {
  local host=$1 start venv out
  start=$(date +%s)
  venv="$ROOT/$host"
  [ -x "$venv/bin/python" ] || { echo "compat[$host]: no prepared venv; run '$0 prepare' first" >&2; exit 1; }
  "$venv/bin/python" install.py                       # as the WebUI runs it at launch
  out=$("$venv/bin/python" install.py)                 # the second launch must be a silent no-op
  [ -z "$out" ] || { echo "compat[$host]: install.py is not a no-op on the second run: $out" >&2; exit 1; }
  "$venv/bin/python" -m pip freeze | grep -iE '^(torch|transformers|diffusers|gradio|peft|numpy|safetensors)[ =@]' \
    | tr '\n' ' '; echo
  "$venv/bin/python" -m pytest -q -m compat -p no:cacheprovider
  echo "compat[$host]: tests done in $(( $(date +%s) - start )) s"
}

# `compat.sh prepare` builds the host venvs (mostly downloads: CI starts it beside the main tests),
# `compat.sh test` runs install.py and the compat subset in them; no argument does both.
# The hosts run side by side; each logs to its own file.
MODE=${1:-all}
pids=()
for host in ${COMPAT_HOSTS:-a1111 forge}; do
  case $MODE in
    prepare) ( prepare_host "$host" ) > "$ROOT/$host.prepare.log" 2>&1 & ;;
    test) ( test_host "$host" ) > "$ROOT/$host.log" 2>&1 & ;;
    all) ( prepare_host "$host" && test_host "$host" ) > "$ROOT/$host.log" 2>&1 & ;;
    *) echo "usage: $0 [prepare|test]" >&2; exit 2 ;;
  esac
  pids+=("$!")
done
status=0
i=0
for host in ${COMPAT_HOSTS:-a1111 forge}; do
  wait "${pids[$i]}" || status=1
  if [ "$MODE" = prepare ]; then cat "$ROOT/$host.prepare.log"; else cat "$ROOT/$host.log"; fi
  i=$((i + 1))
done
exit $status
