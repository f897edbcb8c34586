#!/usr/bin/env bash
# One device call for the SSD work (issue 16): GPU tests (a subset), then the timings and profiles, in
# order of importance; each step's output goes to $OUT/log. Run from the checkout's root:
#     bash benchmarks/ssd_device_run.sh [old checkout for the before-profile]
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 170 python -m pytest -q -x -m gpu tests/gpu/test_ssd.py -k "(dtype1 and (mamba2_gated or docs_init or input_scale)) or (dtype0 and docs_init) or (varlen and dtype1) or no_chain or scan32_w4 or bwd32_w4 or final_states" 2>&1 | tail -8
python benchmarks/gpu_ssd.py --lengths 2048 8192 16384 65536 --chunked-max-len 0
python benchmarks/gpu_ssd.py --profile --lengths 8192
python benchmarks/gpu_ssd.py --heads 64 --groups 8 --lengths 8192 --chunked-max-len 0
python benchmarks/gpu_ssd.py --state 64 --lengths 8192 --chunked-max-len 0
python benchmarks/gpu_ssd.py --sweep --configs default no_chain scan32_w4 bwd32_w4
if [ -n "$1" ]; then
    echo "before (checkout $1):"
    PYTHONPATH=$1 python benchmarks/gpu_ssd.py --profile --lengths 8192 --no-peer
fi
