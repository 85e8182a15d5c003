"""How far the golden-loss configs move when the CPU rounds differently: the tolerance of
``test_core.py::test_first_50_training_losses_are_unchanged`` comes from this.

    python tests/golden_spread.py                  # every setting below, one process each
    python tests/golden_spread.py --jobs 8         # several at a time (a machine with cores to spare)

Each setting reruns both configs' first 50 training losses in a fresh process and prints the largest
absolute and relative difference from ``golden_losses.json``. The settings stand in for other CPUs:
thread counts change how matmuls split their sums, ``ATEN_CPU_CAPABILITY`` the SIMD width of PyTorch's
own kernels, ``MKL_CBWR`` the code path of MKL's BLAS, and oneDNN on / off another matmul library.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "threads 1": {"threads": 1},
    "threads 2": {"threads": 2},
    "threads 4": {"threads": 4},
    "ATEN_CPU_CAPABILITY=default": {"threads": 1, "env": {"ATEN_CPU_CAPABILITY": "default"}},
    "ATEN_CPU_CAPABILITY=avx2": {"threads": 1, "env": {"ATEN_CPU_CAPABILITY": "avx2"}},
    "MKL_CBWR=COMPATIBLE": {"threads": 1, "env": {"MKL_CBWR": "COMPATIBLE"}},
    "MKL_CBWR=AVX2": {"threads": 1, "env": {"MKL_CBWR": "AVX2"}},
    "oneDNN off": {"threads": 1, "mkldnn": False},
}


def child(threads: int, mkldnn: bool) -> None:
    """Print {config: first 50 losses} as JSON, run in this process with the given settings."""
    import torch

    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    sys.path.insert(0, str(HERE))
    from test_core import GOLDEN_CONFIGS, _first_losses

    out = {name: _first_losses(make()) for name, make in GOLDEN_CONFIGS.items()}
    out["torch"] = torch.__version__
    out["capability"] = torch.backends.cpu.get_cpu_capability()
    print("RESULT " + json.dumps(out))


def run(label: str, setting: dict) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg",
           **setting.get("env", {})}
    cmd = [sys.executable, __file__, "--child", str(setting["threads"]), str(int(setting.get("mkldnn", True)))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return f"{label:30s} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    got = json.loads(lines[-1][7:])
    golden = json.loads((HERE / "golden_losses.json").read_text())
    parts = []
    for name in golden:
        diffs = [abs(a - b) for a, b in zip(got[name], golden[name])]
        rel = max(d / abs(b) for d, b in zip(diffs, golden[name]))
        parts.append(f"{name}: max abs {max(diffs):.2e} rel {rel:.2e}")
    return f"{label:30s} torch {got['torch']} ({got['capability']}) | " + " | ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, type=int, metavar=("THREADS", "MKLDNN"), help=argparse.SUPPRESS)
    ap.add_argument("--jobs", type=int, default=1, help="settings run at a time")
    ap.add_argument("--only", default="", help="comma-separated setting labels (default: all)")
    args = ap.parse_args()
    if args.child:
        child(args.child[0], bool(args.child[1]))
        return
    cpuinfo = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if ln.startswith("model name")]
    print(f"CPU: {names[0] if names else 'unknown'}, {os.cpu_count()} cores")
    labels = [s.strip() for s in args.only.split(",") if s.strip()] or list(SETTINGS)
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda k: run(k, SETTINGS[k]), labels):
            print(line, flush=True)


if __name__ == "__main__":
    main()
