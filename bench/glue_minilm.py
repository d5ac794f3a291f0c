"""The committed six-method GLUE table (issue 16): tune the learning rate, run the final seeds, report.

The README's protocol (tune → run → report) as one resumable job queue, so that it can be killed and finished
later, on a CPU or on a GPU (`--extra trainer.device=cuda`):

  1. tune   every method × task × lr of the grid on the tuning seeds (101, 102)
  2. select `python -m report tune/jobs --select-lr tune/selected`: per method × task, the lr with the best mean
            best-epoch dev score over the tuning seeds (lorabench/tuning.py), written as task_method/ configs
  3. final  every method × task on seeds 1, 2, 3, composing the selection (hydra.searchpath=[file://…/selected])
            exactly as the README's final sweep does; the final seeds never took part in the choice
  4. report `python -m report final/jobs --out bench/results/glue_minilm` (paired Δ vs LoRA, Pareto plot)

Two protocols, each the same for every method: the default model (minilm), budget r8 with budget.match=params
(AdaLoRA and DoRA-dynamic at LoRA r8's stored size), 3 epochs, batch 32, sequence 128, full dev sets.
  full  the issue's: SST-2 trains on a fixed 8000-example subset of its 67k, the other tasks on all of their
        training sets; lr grid 2e-4 … 2e-3 on tuning seeds 101, 102 and every task; one lr per method × task.
        ~330 jobs: ~40 min of an H200 at 14 jobs at once, ~49 h of a 2-core CPU.
  cpu   cut to fit ~12 h of a 2-core CPU: every task trains on a fixed 2000-example subset (RTE 2000 of 2490);
        the lr grid 5e-4 … 8e-3 runs on tuning seed 101 and the three short-sequence tasks (SST-2, CoLA, STS-B),
        and one lr per method is chosen over them (lorabench/tuning.py: with every task at the same size, the
        data-size reason for a per-task lr is gone, and a mean over three tasks is a less noisy choice than one
        seed of one task) and used on all five tasks. 90 tuning + 90 final jobs. The grid reaches 8e-3 because
        AdaLoRA's and DoRA-dynamic's scales (alpha / r_init = 16/12, 8/12) are below LoRA's (16/8), and under
        Adam the function moves with scale x lr, so their best lr lies up to 3x above LoRA's.
Both: a method whose best lr is its grid's largest (smallest) gets one more lr, x2 (/2), and the selection is
redone, up to EXTEND_STEPS beyond the protocol's grid: a best lr at the grid's edge is not a tuned one.
The protocol is recorded in <results>/protocol.json; a results folder refuses another protocol.

  python bench/glue_minilm.py --protocol cpu         # all of it, 2 jobs at a time (2 cores)
  python bench/glue_minilm.py --phase tune --jobs 14 --extra trainer.device=cuda --deadline-s 400
  python bench/glue_minilm.py --list                 # the jobs and what is done

The jobs import the checkout's src/ when each starts, so editing the code while the queue runs changes (or
breaks) the jobs still to come: run it from a frozen worktree and write into the checkout,
  git worktree add /tmp/frozen HEAD && cd /tmp/frozen &&
  python bench/glue_minilm.py --protocol cpu --results <checkout>/bench/results/glue_minilm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jobqueue
from jobqueue import REPO, Job

METHODS = ["lora", "dora", "adalora", "dora_dynamic", "xgblora", "dynamic_lora"]
COMMON = ["trainer.epochs=3", "logger=none", "trainer.progress_bar=false", "budget=r8", "budget.match=params"]
FINAL_SEEDS = "1,2,3"
EXTEND_STEPS = 2  # a method's grid may grow by at most 2 doublings above (or halvings below) the protocol's
PROTOCOLS = {
    # tasks: per-task overrides, largest first, so that the long jobs do not start last and leave the queue's
    # tail to one process
    "full": {"tasks": {"sst2": ["trainer.max_train_samples=8000"], "cola": [], "stsb": [], "mrpc": [], "rte": []},
             "tune_tasks": ["sst2", "cola", "stsb", "mrpc", "rte"], "lrs": "2e-4,5e-4,1e-3,2e-3",
             "tune_seeds": "101,102", "select_by": "task"},
    "cpu": {"tasks": {t: ["trainer.max_train_samples=2000"] for t in ("rte", "mrpc", "stsb", "sst2", "cola")},
            "tune_tasks": ["sst2", "cola", "stsb"], "lrs": "5e-4,1e-3,2e-3,4e-3,8e-3", "tune_seeds": "101",
            "select_by": "method"},
}


def tune_jobs(root: Path, proto: dict, grid: dict[str, list[str]], seeds: list[str], extra: list[str]) -> list[Job]:
    """The tuning jobs of `grid` (method → its lrs, in order)."""
    longest = max(len(lrs) for lrs in grid.values())
    return [Job(f"tune {m} {t} lr={grid[m][k]} s{s}", root / "tune" / "jobs" / m / f"{t}_lr{grid[m][k]}_s{s}",
                (f"method={m}", f"task={t}", f"seed={s}", f"trainer.lr={grid[m][k]}", *COMMON, *proto["tasks"][t],
                 *extra))
            for s in seeds for k in range(longest) for t in proto["tune_tasks"] for m in METHODS if k < len(grid[m])]


def lr_name(lr: float) -> str:
    """2e-3, 1.6e-2, 2.5e-4: the grid's spelling (a job folder's name and its trainer.lr)."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def method_grids(root: Path, lrs: list[str]) -> dict[str, list[str]]:
    """Each method's grid: the protocol's, plus the lrs that an edge extension (`extend_grids`) added, read back
    from the tuning folders' names so that a resumed queue, `--list` and the report see them."""
    grids = {}
    for m in METHODS:
        found = {d.name.split("_lr")[1].rsplit("_s", 1)[0] for d in (root / "tune" / "jobs" / m).glob("*_lr*_s*")}
        grids[m] = sorted(set(lrs) | found, key=float)
    return grids


def extend_grids(root: Path, grids: dict[str, list[str]], lrs: list[str]) -> dict[str, list[str]]:
    """Methods whose selected lr is their grid's largest (or smallest): the next lr beyond it (x2 or /2), when
    that stays within EXTEND_STEPS of the protocol's grid. A best lr at the edge of the grid is not a tuned one:
    the methods' scales differ (alpha / r), so their best lrs lie at different places. Returns method → [new lr]."""
    chosen = json.loads((root / "tune" / "selected" / "selected_lr.json").read_text())
    lo, hi = min(map(float, lrs)) / 2 ** EXTEND_STEPS, max(map(float, lrs)) * 2 ** EXTEND_STEPS
    more: dict[str, set[str]] = {}
    for choice in chosen:  # one per method, or (selection per task) one per method × task
        grid = [float(lr) for lr in grids[choice["method"]]]
        best = float(choice["selected"])
        step = 2.0 if best >= max(grid) else 0.5 if best <= min(grid) else None
        if step is not None and lo * 0.999 <= best * step <= hi * 1.001:
            more.setdefault(choice["method"], set()).add(lr_name(best * step))
    return {m: sorted(new, key=float) for m, new in more.items()}


def final_jobs(root: Path, proto: dict, seeds: list[str], extra: list[str]) -> list[Job]:
    selected = root / "tune" / "selected"
    rel = selected.resolve().relative_to(REPO) if selected.resolve().is_relative_to(REPO) else selected.resolve()
    return [Job(f"final {m} {t} s{s}", root / "final" / "jobs" / m / f"{t}_s{s}",
                (f"method={m}", f"task={t}", f"seed={s}", *COMMON, *opts, *extra,
                 f"hydra.searchpath=[file://{rel}]"))
            for s in seeds for t, opts in proto["tasks"].items() for m in METHODS]


def pin_protocol(root: Path, name: str, record: dict) -> None:
    """The first run writes <root>/protocol.json; a later one must ask for the same protocol (a folder that mixes
    two would report jobs that do not compare)."""
    path = root / "protocol.json"
    if path.exists():
        held = json.loads(path.read_text())
        if held != record:
            raise SystemExit(f"{root} holds protocol {held.get('name')!r} with other settings ({path}); "
                             f"use another --results folder for protocol {name!r}")
        return
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def select(root: Path, proto: dict) -> bool:
    """Writes tune/selected/ from the tuning jobs; False unless every method × task has a selection."""
    by = ["--select-lr-by", "method", "--select-for", ",".join(proto["tasks"])] \
        if proto["select_by"] == "method" else []
    code = jobqueue.report(root / "tune" / "jobs", root / "tune", "--select-lr", str(root / "tune" / "selected"),
                           *by)
    chosen = root / "tune" / "selected" / "selected_lr.json"
    if code not in (0, 1) or not chosen.exists():
        return False
    missing = [f"{t}_{m}" for m in METHODS for t in proto["tasks"]
               if not (root / "tune" / "selected" / "task_method" / f"{t}_{m}.yaml").exists()]
    if missing:
        print(f"no selection for {', '.join(missing)}", file=sys.stderr)
    return not missing


def job_facts(jobs: list[Job]) -> tuple[int, float]:
    """(jobs finished ok, their summed wall seconds) from their results.json."""
    done, seconds = 0, 0.0
    for j in jobs:
        if jobqueue.finished_ok(j.run_dir):
            done += 1
            seconds += json.loads((j.run_dir / "results.json").read_text())["timings"]["wall_seconds"]
    return done, seconds


def write_protocol_md(root: Path, record: dict, tune: list[Job], final: list[Job], jobs_at_once: int) -> Path:
    """<root>/protocol.md: the facts of the table (protocol, progress, job time, the selection) written from the
    files, so the table's hand-written README.md can cite them and keep only the reading."""
    lines = [f"# GLUE table protocol `{record['name']}` (written by bench/glue_minilm.py)", "",
             f"Command: `python bench/glue_minilm.py --protocol {record['name']}` (resumable; `--list` shows the "
             f"jobs)", "",
             "| setting | value |", "|---|---|",
             f"| methods | {', '.join(METHODS)} |",
             f"| every job | {' '.join(record['common'])} |",
             *(f"| {t} | {' '.join(opts) or 'the whole training set'} |" for t, opts in record["tasks"].items()),
             f"| lr grid | {', '.join(record['lrs'])} on tuning seed(s) {', '.join(record['tune_seeds'])} and "
             f"{', '.join(record['tune_tasks'])}; a method whose best lr is the grid's largest (smallest) gets "
             f"the next x2 (/2), up to {record['extend_steps']} steps |",
             f"| lr selection | one per {record['select_by']} (lorabench/tuning.py) |",
             f"| final seeds | {', '.join(record['final_seeds'])} |", "",
             "| phase | jobs ok | summed job wall time | wall time at "
             f"{jobs_at_once} at once |", "|---|---|---|---|"]
    for phase, jobs in (("tune", tune), ("final", final)):
        done, seconds = job_facts(jobs)
        lines.append(f"| {phase} | {done} of {len(jobs)} | {seconds / 3600:.1f} h | ≈ {seconds / 3600 / jobs_at_once:.1f} h |")
    sel = root / "tune" / "selected" / "selected_lr.json"
    if sel.exists():
        lines += ["", "Selected learning rates (↑ / ↓: the method's largest / smallest lr, where a better one may "
                      "lie beyond it):", ""]
        for c in json.loads(sel.read_text()):
            grid = [float(lr) for lr in c["means"]]
            edge = " ↑" if c["selected"] >= max(grid) else " ↓" if c["selected"] <= min(grid) else ""
            lines.append(f"- {c['method']}: {c['selected']:g}{edge} (mean ×100 per lr: "
                         + ", ".join(f"{lr}: {100 * m:.2f}" for lr, m in c["means"].items()) + ")")
    path = root / "protocol.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu",
                    help="full: the issue's (a GPU's hours); cpu: cut to ~12 h of 2 cores (see the module text)")
    ap.add_argument("--phase", choices=["tune", "final", "all", "report"], default="all")
    ap.add_argument("--lrs", default=None, help="the tuning grid (default: the protocol's)")
    ap.add_argument("--tune-seeds", default=None, help="default: the protocol's")
    ap.add_argument("--seeds", default=FINAL_SEEDS, help="the final seeds")
    ap.add_argument("--jobs", type=int, default=2, help="jobs at once, one torch thread each")
    ap.add_argument("--extra", default="", help="space-separated overrides for every job that leave the protocol "
                                                "alone, e.g. trainer.device=cuda")
    ap.add_argument("--deadline-s", type=float, default=None, help="start no job after this many seconds")
    ap.add_argument("--results", default=str(REPO / "bench" / "results" / "glue_minilm"))
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    proto = PROTOCOLS[args.protocol]
    lrs, tune_seeds = (args.lrs or proto["lrs"]).split(","), (args.tune_seeds or proto["tune_seeds"]).split(",")
    root, extra = Path(args.results), args.extra.split()
    record = {"name": args.protocol, **proto, "lrs": lrs, "tune_seeds": tune_seeds,
              "final_seeds": args.seeds.split(","), "common": COMMON, "extend_steps": EXTEND_STEPS}
    pin_protocol(root, args.protocol, record)
    grids = method_grids(root, lrs)
    tune = tune_jobs(root, proto, grids, tune_seeds, extra)
    final = final_jobs(root, proto, args.seeds.split(","), extra)
    if args.list:
        for j in tune + final:
            print(f"{'ok  ' if jobqueue.finished_ok(j.run_dir) else '    '}{j.name}")
        return 0
    failed = 0
    if args.phase in ("tune", "all"):
        while True:  # the grid, then one more lr beyond the edge for each method whose best sits there
            _, f = jobqueue.run_queue(tune, args.jobs, args.deadline_s)
            failed += f
            if not all(jobqueue.finished_ok(j.run_dir) for j in tune):
                print("tuning is not complete: run again to finish it", file=sys.stderr)
                return 1
            if not select(root, proto):
                return 1
            more = extend_grids(root, grids, lrs)
            if not more:
                break
            print("best lr at the grid's edge, extending: "
                  + ", ".join(f"{m} {', '.join(new)}" for m, new in more.items()))
            grids = {m: sorted(grids[m] + more.get(m, []), key=float) for m in METHODS}
            tune = tune_jobs(root, proto, grids, tune_seeds, extra)
    if args.phase in ("final", "all"):
        if not select(root, proto):
            print("no complete learning-rate selection: finish the tuning phase first", file=sys.stderr)
            return 1
        _, f = jobqueue.run_queue(final, args.jobs, args.deadline_s)
        failed += f
    if args.phase in ("final", "all", "report") and (root / "final" / "jobs").exists():
        jobqueue.report(root / "final" / "jobs", root)
    print(f"wrote {write_protocol_md(root, record, tune, final, args.jobs)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
