#!/usr/bin/env bash
# The main job: sets up .venv, then trains a Q-Adapter on the built-in task with the embedded
# default model (CPU is enough) and prints the before/after table. Extra arguments go to
# `qadapter demo` (see `qadapter demo --help`).
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec "$VENV/bin/qadapter" demo "$@"
