"""Hand-run benchmarks of keras-kd (never part of CI).

`python -m benchmarks.run` (or `make benchmarks`) runs every module listed in
`benchmarks.run.MODULES` once per backend and writes their results to
`benchmarks/results/`, which `BENCHMARKS.md` quotes.
"""
