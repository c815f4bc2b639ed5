"""Trials per minute with 1 and 2 `autocompress worker` processes on one study of the digits problem.

Each configuration gets a fresh study (`autocompress run --data digits --trials 0` into a journal file), then N
workers that each add trials/N trials; the clock runs from starting the workers until the last one exits. Two rates
are printed: over that wall time (process start-up included) and over the trials themselves (first trial start
to last trial end, from the study's timestamps). Each worker gets cores / N torch threads. Median over --repeats
runs. Usage:

    .venv/bin/python scripts/bench_workers.py [--trials 12] [--workers 1 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autocompress.search.storage import open_storage

CLI = [sys.executable, "-m", "autocompress.cli"]


def one_run(folder: Path, workers: int, trials: int) -> tuple[float, float]:
    """(wall seconds, seconds from the first trial's start to the last one's end) for one fresh study."""
    folder.mkdir(parents=True)
    storage = f"journal:{folder / 'study.log'}"
    subprocess.run([*CLI, "run", "--data", "digits", "--storage", storage, "--study", "bench", "--trials", "0",
                    "--out", str(folder / "run"), "--no-progress"], check=True, capture_output=True)
    logs = [folder / f"worker{i}.log" for i in range(workers)]
    start = time.perf_counter()
    # the cores shared out: workers that each start one torch thread per core oversubscribe them, and spinning
    # OpenMP threads then slow every worker down many times over
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    procs = [subprocess.Popen([*CLI, "worker", "--storage", storage, "--study", "bench", "--trials",
                               str(trials // workers), "--no-progress"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                              env=env)
             for log in logs]
    for proc, log in zip(procs, logs):
        if proc.wait():
            raise SystemExit(f"a worker failed:\n{log.read_text()[-2000:]}")
    wall = time.perf_counter() - start
    done = optuna.load_study(study_name="bench", storage=open_storage(storage)).get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == trials, f"{len(done)} trials completed, {trials} asked"
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return wall, span


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12, help="trials per configuration (divisible by each worker count)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"digits problem (digits_resnet, --data digits, default budgets), journal storage, {os.cpu_count()} CPU "
          f"cores, load average at start {os.getloadavg()[0]:.2f}; {args.trials} trials, median of {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            runs = [one_run(Path(tmp) / f"{workers}-{r}", workers, args.trials) for r in range(args.repeats)]
            wall = statistics.median(w for w, _ in runs)
            span = statistics.median(s for _, s in runs)
            rows.append((workers, wall, 60 * args.trials / wall, 60 * args.trials / span))
    base = rows[0]
    print(f"{'workers':>7} {'wall s':>8} {'trials/min (wall)':>18} {'trials/min (trials)':>20} {'speedup (wall)':>15} "
          f"{'speedup (trials)':>17}")
    for workers, wall, per_wall, per_span in rows:
        print(f"{workers:>7} {wall:>8.1f} {per_wall:>18.2f} {per_span:>20.2f} {per_wall / base[2]:>15.2f} "
              f"{per_span / base[3]:>17.2f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
