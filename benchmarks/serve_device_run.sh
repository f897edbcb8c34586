#!/usr/bin/env bash
# One device call for the serving engine (issue 22), about 300 s (330 s at most): the GPU engine tests, the prefix
# cache on / off with no shared prefix (mamba2-130m bf16, CUDA graphs, 64 and 256 clients, rounds alternating),
# then the shared 16,000-token document through real `ssmkit serve` processes (byte-small, CUDA). Each part
# runs under its own time limit, so a hang cannot eat the call.
#
# The device lacks the serving stack: carry its wheels (py3.12, pure Python but pydantic-core) in .whl3/
# (fastapi, starlette, uvicorn, pydantic, pydantic-core, annotated-types, typing-inspection, typing_extensions,
# opentelemetry-api, sse-starlette; the device has anyio, click, h11, httpx, jinja2 and the rest). From the
# checkout's root, with carry [".whl3"]:   bash benchmarks/serve_device_run.sh
# ROUNDS (default 3) sets the on / off rounds of the engine benchmark.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
git log --oneline -1 2>/dev/null
if ls .whl3/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl3/*.whl \
        && export PYTHONPATH=$PWD:/tmp/site
fi
timeout 20 python3 -c "import fastapi, uvicorn, sse_starlette, ssmkit.serve.app; print('serving stack: fastapi',
fastapi.__version__, 'uvicorn', uvicorn.__version__)" || echo "the serving stack does not import: the last part will fail"
echo "== GPU engine tests"
timeout 80 python3 -m pytest -q --tb=short -m gpu tests/gpu/test_serve_engine.py 2>&1 | tail -30
echo "== prefix cache on / off, no shared prefix (load average $(cut -d' ' -f1 /proc/loadavg))"
timeout 110 python3 benchmarks/serve_engine.py --preset mamba2-130m --device cuda --concurrency 64 256 \
    --max-new-tokens 128 --rounds "${ROUNDS:-3}"
echo "== shared document through real servers"
timeout 120 python3 benchmarks/serve.py --device cuda --concurrency --sessions 0 \
    --doc-tokens 16000 --questions 64 --cold-questions 4 2>&1 | tail -20
