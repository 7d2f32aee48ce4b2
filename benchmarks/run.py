"""Runs the CPU benchmarks once per backend and refreshes their results.

    python -m benchmarks.run                  # everything (make benchmarks)
    python -m benchmarks.run --backends torch --modules bench_divergence
    python -m benchmarks.run --quick          # smoke run, under runs/

Each module of `MODULES` runs in its own interpreter per backend (a backend
is chosen once per process) as `python -m benchmarks.<module> [--quick]
--results-dir DIR` with `KERAS_BACKEND` set, and writes its markdown
fragment `DIR/<name>_<backend>.md` (`benchmarks.common`), which states the
command, versions, device and date. `BENCHMARKS.md` quotes these
fragments; after a run, update the tables there that it re-measured.
`benchmarks.bench_gpu` is not run here: it needs a GPU machine
(`benchmarks/gpu_session.sh`).
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

MODULES = [
    "bench_divergence",
    "bench_fused_linear",
    "bench_distiller",
    "bench_advanced",
    "bench_rdrop",
    "bench_causal_lm",
    "bench_on_policy",
    "bench_alignment",
    "bench_cross_vocab",
]
BACKENDS = ["tensorflow", "torch", "jax"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends", nargs="+", default=BACKENDS, choices=BACKENDS
    )
    parser.add_argument(
        "--modules", nargs="+", default=MODULES, choices=MODULES
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few repeats, small shapes; writes under "
        "runs/benchmarks-quick/ unless --results-dir is given",
    )
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds allowed per module and backend",
    )
    args = parser.parse_args(argv)
    if args.results_dir is None:
        quick = common.REPO_ROOT / "runs" / "benchmarks-quick"
        args.results_dir = quick if args.quick else common.RESULTS_DIR
    return args


def run_module(module, backend, args):
    command = [sys.executable, "-m", f"benchmarks.{module}"]
    command += ["--results-dir", str(args.results_dir)]
    command += ["--quick"] if args.quick else []
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(f"=== {module} on {backend}", flush=True)
    start = time.perf_counter()
    try:
        code = subprocess.run(
            command, cwd=common.REPO_ROOT, env=env, timeout=args.timeout
        ).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    seconds = time.perf_counter() - start
    print(f"=== {module} on {backend}: exit {code}, {seconds:.0f} s")
    return code == 0


def main(argv=None):
    args = parse_args(argv)
    failures = [
        f"{module} on {backend}"
        for module in args.modules
        for backend in args.backends
        if not run_module(module, backend, args)
    ]
    print(f"fragments in {args.results_dir}")
    if failures:
        print("failed: " + ", ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
