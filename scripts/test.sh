#!/usr/bin/env bash
# README's test command: installs what the tests need, then runs the whole suite with pytest
# (CPU; GPU tests skip without CUDA). The same script CI runs, so the two never drift apart.
exec bash "$(dirname "$0")/../.ci/run" "$@"
