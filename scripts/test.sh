#!/usr/bin/env bash
# Installs what the tests need, then runs the whole test suite (CPU; GPU tests skip without CUDA).
source "$(dirname "$0")/env.sh"
cd "$ROOT"
set +e
"$PY" -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no test: treating that as a failure" >&2
  exit 1
fi
exit "$status"
