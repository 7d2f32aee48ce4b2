"""Runs the benchmarks once per backend and assembles `BENCHMARKS.md`.

    python -m benchmarks.run                  # all (make benchmarks)
    python -m benchmarks.run --backends torch --modules bench_kl
    python -m benchmarks.run --quick          # smoke run, see --output

Each module in `MODULES` runs in its own interpreter per backend (a backend
is chosen once per process), as `python -m benchmarks.<module> [--quick]
--results-dir DIR` with `KERAS_BACKEND` set, and writes markdown fragments
into DIR (see `benchmarks.common`). `BENCHMARKS.md` is then rebuilt from a
machine header and every fragment in DIR, so a partial run refreshes its own
fragments and keeps the others. Adding a benchmark is one line in `MODULES`;
a listed module whose file does not exist yet is skipped. Sections measured
elsewhere (`EXTRA_SECTIONS`: the loss engine, the fused linear losses, the
GPU runs) are fragments in DIR as well.
"""

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

MODULES = [
    "bench_kl",
    "bench_rdrop",
    "bench_distiller",
    "bench_advanced",
]
# Sections that follow the modules' ones: measured by modules run apart
# from `make benchmarks` (on a lent GPU, by hand) and summaries written
# across runs, each kept as a fragment (`<name>.md` notes, then
# `<name>_<backend>.md`) so that assembling never drops them.
EXTRA_SECTIONS = ["engine", "fused_linear", "causal_lm", "gpu"]
BACKENDS = ["tensorflow", "torch", "jax"]
PACKAGE_DIR = Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=BACKENDS,
        choices=BACKENDS,
        help="backends to run (default: all three)",
    )
    parser.add_argument(
        "--modules",
        nargs="+",
        default=MODULES,
        help="benchmark modules to run (default: all in MODULES)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few repeats, small shapes; writes under runs/ unless "
        "--output/--results-dir are given",
    )
    parser.add_argument(
        "--assemble-only",
        action="store_true",
        help="measure nothing; rebuild the output from existing fragments",
    )
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds allowed per module and backend",
    )
    args = parser.parse_args(argv)
    quick_root = common.REPO_ROOT / "runs" / "benchmarks-quick"
    if args.results_dir is None:
        args.results_dir = (
            quick_root / "results" if args.quick else common.RESULTS_DIR
        )
    if args.output is None:
        args.output = (
            quick_root / "BENCHMARKS.md"
            if args.quick
            else common.REPO_ROOT / "BENCHMARKS.md"
        )
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
    return code == 0, seconds


def fragment_order(results_dir):
    """Fragments grouped per benchmark, in `MODULES` order, then others.

    Within a benchmark: `<name>.md` (method notes) first, then one
    `<name>_<backend>.md` per backend in `BACKENDS` order.
    """
    paths = sorted(Path(results_dir).glob("*.md"))
    names = [m.removeprefix("bench_") for m in MODULES]
    names += [n for n in EXTRA_SECTIONS if n not in names]
    names += sorted(
        {_benchmark_name(p.stem) for p in paths} - set(names), key=str
    )

    def key(path):
        name = _benchmark_name(path.stem)
        suffix = path.stem[len(name) :].lstrip("_")
        rank = BACKENDS.index(suffix) + 1 if suffix in BACKENDS else 0
        return names.index(name), rank, suffix

    return sorted(paths, key=key)


def _benchmark_name(stem):
    match = re.fullmatch(r"(.+)_(" + "|".join(BACKENDS) + r")", stem)
    return match.group(1) if match else stem


def header(argv, load_before):
    versions = ", ".join(
        f"{p} {common.version(p)}"
        for p in common.PACKAGES
        if common.version(p) is not None
    )
    settings = [
        f"{key}={shlex.quote(os.environ[key])}"
        for key in common.SETTINGS
        if key in os.environ
    ]
    command = " ".join(settings + ["python -m benchmarks.run", *argv])
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""\
# keras-kd benchmarks

`make benchmarks` (`python -m benchmarks.run`) measures everything below
and rebuilds this file; `--modules` and `--backends` re-measure a part.
This file was assembled {stamp} by `{command}` from the fragments in
`benchmarks/results/`: each section states its own backend, device, the
settings it ran with and when it was measured.

- Machine: {common.machine_summary()}; GPU: {_gpu()}.
- Packages: {versions}.
- Load average (1 min) when this command started: {load_before:.2f}.

How to read the numbers: every time is the median over timed calls after
warm-up, with the interquartile range in parentheses; ratios divide
medians measured in the same process, in interleaved rounds, so that load
from other processes falls on all implementations alike. The machine may
be shared with other jobs (see the load averages): absolute times are
noisy, the ratios much less so. On a CPU shared with other jobs torch's
default of one intra-op thread per core stalls small operations for tens
of milliseconds whenever a helper thread waits for a core; set
`OMP_NUM_THREADS=1` there (each section says whether it did).
"""


def _gpu():
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        names = ""
    return names.replace("\n", ", ") or "none"


def contents(fragments):
    """Links to the headings: a benchmark's `##` section, if it has one,
    with its `###` per-backend sections under it."""
    lines = ["Contents:", ""]
    nested, last = False, None
    for path, text in fragments:
        name = _benchmark_name(path.stem)
        if name != last:
            nested, last = False, name
        for line in text.splitlines():
            match = re.match(r"(##|###) (.+)", line)
            if not match:
                continue
            nested = nested or match.group(1) == "##"
            indent = "  " if nested and match.group(1) == "###" else ""
            title = match.group(2).strip()
            anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            lines.append(f"{indent}- [{title}](#{anchor})")
    return "\n".join(lines) + "\n"


def assemble(args, argv, load_before):
    fragments = [
        (path, path.read_text().rstrip() + "\n")
        for path in fragment_order(args.results_dir)
    ]
    parts = [header(argv, load_before), contents(fragments)]
    parts += [text for _, text in fragments]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(parts))
    print(f"wrote {args.output}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    failures = []
    for module in [] if args.assemble_only else args.modules:
        if not (PACKAGE_DIR / f"{module}.py").exists():
            print(f"=== {module}: no such module yet, skipped")
            continue
        for backend in args.backends:
            ok, _ = run_module(module, backend, args)
            if not ok:
                failures.append(f"{module} on {backend}")
    assemble(args, argv, load_before)
    if failures:
        print("failed: " + ", ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
