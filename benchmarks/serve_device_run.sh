#!/usr/bin/env bash
# One device call for the serving engine (issue 22), at most 240 s: the GPU engine tests, the engine
# benchmark (prefix cache on / off / overlap off, mamba2-130m bf16, CUDA graphs), then the shared 16K-token
# document through real servers (byte-small). Each part under its own time limit, so a hang cannot eat
# the call. Run from the checkout's root: bash benchmarks/serve_device_run.sh
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
git log --oneline -1 2>/dev/null
timeout 70 python -m pytest -v --tb=short -m gpu tests/gpu/test_serve_engine.py 2>&1 | tail -60
timeout 110 python benchmarks/serve_engine.py --preset mamba2-130m --device cuda --concurrency 1 64 256 \
    --max-new-tokens 128 --rounds 1 --serial
timeout 60 python benchmarks/serve.py --device cuda --concurrency 1 --requests 2 --rounds 1 --sessions 0 \
    --doc-tokens 16000 --questions 64 --cold-questions 4 2>&1 | tail -16
