"""All GPU benchmarks in one call: each ``benchmarks/gpu_<name>.py`` in its own process, one after another.

Each prints its own table (ours vs the PyTorch chunked path vs mamba_ssm where it runs, with the
bandwidth/FLOP floor); this driver adds the device, the versions and a time limit per script, and keeps
going when one fails, so a single device call measures everything.

    python benchmarks/gpu.py                         # every gpu_*.py
    python benchmarks/gpu.py ssd selective_scan      # some of them
    python benchmarks/gpu.py --log-dir $OUT          # also keep each script's full output
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="benchmark names (gpu_<name>.py); default: all")
    parser.add_argument("--timeout", type=float, default=240, help="seconds allowed to each script")
    parser.add_argument("--log-dir", type=Path, help="write <name>.log files here")
    args, extra = parser.parse_known_args()
    import torch

    names = args.names or sorted(p.stem[len("gpu_"):] for p in HERE.glob("gpu_*.py"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"device: {device}; torch {torch.__version__}; triton {triton_version}; python {sys.version.split()[0]}")
    failed = []
    for name in names:
        script = HERE / f"gpu_{name}.py"
        if not script.is_file():
            print(f"\n=== {name}: no such benchmark ({script.name})")
            failed.append(name)
            continue
        print(f"\n=== {name}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(script), *extra], capture_output=True, text=True,
                                  timeout=args.timeout, cwd=HERE.parent)
            output, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            output, code = output + f"\n(timed out after {args.timeout:.0f} s)", -1
        if args.log_dir:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            (args.log_dir / f"{name}.log").write_text(output)
        print(output.rstrip()[-6000:])
        print(f"--- {name}: exit {code}, {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
