#!/usr/bin/env bash
# One device call for the SSD work (issue 16): GPU tests (a subset), then timings and profiles in order
# of importance, each under its own time limit (a hang, e.g. in the chained state passing, cannot eat
# the whole call). Run from the checkout's root: bash benchmarks/ssd_device_run.sh [short]
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "$1" = short ]; then
    timeout 80 python -m pytest -q -x -m gpu tests/gpu/test_ssd.py -k "(dtype1 and (mamba2_gated or docs_init) and 4097) or final_states or (varlen and dtype1 and scale) or chain" 2>&1 | tail -8
    timeout 70 python benchmarks/gpu_ssd.py --sweep --configs default no_chain
    timeout 60 python benchmarks/gpu_ssd.py --lengths 8192 --chunked-max-len 0
    exit
fi
timeout 150 python -m pytest -q -x -m gpu tests/gpu/test_ssd.py -k "(dtype1 and (mamba2_gated or docs_init or input_scale)) or (dtype0 and docs_init) or (varlen and dtype1) or chain or final_states" 2>&1 | tail -8
timeout 150 python benchmarks/gpu_ssd.py --lengths 2048 8192 16384 65536 --chunked-max-len 0
timeout 60 python benchmarks/gpu_ssd.py --profile --lengths 8192
timeout 60 python benchmarks/gpu_ssd.py --sweep --configs default no_chain
timeout 45 python benchmarks/gpu_ssd.py --heads 64 --groups 8 --lengths 8192 --chunked-max-len 0
timeout 45 python benchmarks/gpu_ssd.py --state 64 --lengths 8192 --chunked-max-len 0
