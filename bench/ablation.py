"""The xgblora / dynamic_lora ablations (issue 13): named arms × tasks × seeds, one `python -m train` per job.

Each arm is a list of overrides on top of the common protocol (the LoRA arm's trainer settings: same lr, epochs,
batch and sequence length for every arm). Jobs run `--jobs` at a time with one torch thread each: on two cores
that is 1.26× the throughput of one job with two threads (measured in the README next to the results). A job
whose results.json says "ok" is skipped, so the script can be killed and re-run to finish later; the order puts
the arms the acceptance needs first. When the queue is done (or with --report-only) every study's report is
rebuilt with `python -m report`.

  python bench/ablation.py                              # every arm of both studies, 3 seeds, MRPC + SST-2 4k
  python bench/ablation.py --arms lora,xgb_rev2 --seeds 1
  python bench/ablation.py --list                       # the arms and their overrides
  python bench/ablation.py --report-only
  python bench/ablation.py --jobs 12 --extra trainer.device=cuda --results /tmp/gpu   # all arms on one GPU

Runs land in bench/results/ablation_<study>/jobs/<arm>/<task>_s<seed>/ (results.json, metrics.jsonl,
train_log.jsonl and .hydra/ are committed; adapter weights are git-ignored). The LoRA arm is shared: it runs once
under ablation_xgblora and is copied into ablation_dynamic_lora for that report.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import jobqueue
from jobqueue import REPO, Job
RESULTS = REPO / "bench" / "results"  # --results moves it (e.g. run a frozen worktree, write into the checkout)

COMMON = ["trainer.epochs=3", "logger=none", "trainer.progress_bar=false", "budget=r8"]
TASKS = {"mrpc": [], "sst2": ["trainer.max_train_samples=4000"]}


def xgb(**over) -> list[str]:
    """An xgblora arm: the ablation's base (§5.5 revision 2 as first shipped: rank-1 boosters, alpha 16, spelled
    out so that the arms mean what they meant when they ran, whatever conf/method/xgblora.yaml now ships) with
    one or more options changed."""
    opts = {"booster_rank": 1, "alpha": 16, **over}
    return ["method=xgblora", *(f"method.{k}={v}" for k, v in opts.items())]


# arm name -> (study, overrides). Order = run priority (the acceptance's arms first).
ARMS: dict[str, tuple[str, list[str]]] = {
    "lora": ("xgblora", ["method=lora"]),
    "xgb_rev2": ("xgblora", xgb()),
    "dyn_rev2": ("dynamic_lora", ["method=dynamic_lora"]),
    "xgb_rev1": ("xgblora", xgb(alpha=2, steps_per_booster=100, layers_per_booster=2, block_sampling="uniform")),
    "dyn_scale_only": ("dynamic_lora", ["method=dynamic_lora", "method.gate=none"]),
    "dyn_gate_only": ("dynamic_lora", ["method=dynamic_lora", "method.allocation=none"]),
    "xgb_rank2": ("xgblora", xgb(booster_rank=2)),
    "dyn_weighted_importance": ("dynamic_lora", ["method=dynamic_lora", "method.unweighted_importance=false"]),
    "dyn_no_preserve": ("dynamic_lora", ["method=dynamic_lora", "method.preserve_function=false"]),
    "xgb_alpha8": ("xgblora", xgb(alpha=8)),
    "xgb_ls2": ("xgblora", xgb(layers_per_booster=2)),
    "xgb_n16": ("xgblora", xgb(n_boosters=16)),
    "xgb_rank4": ("xgblora", xgb(booster_rank=4)),
    # follow-ups after the first full run (rank 4 was the best xgblora arm, α the other lever under Adam); the
    # first is what conf/method/xgblora.yaml now ships
    "xgb_rank4_alpha32": ("xgblora", xgb(booster_rank=4, alpha=32)),
    "xgb_rank4_alpha64": ("xgblora", xgb(booster_rank=4, alpha=64)),
    "dyn_rev1": ("dynamic_lora", ["method=dynamic_lora", "method.unweighted_importance=false",
                                  "method.preserve_function=false", "method.beta=0.85", "method.realloc_interval=100",
                                  "method.w_min=0.25", "method.w_max=4", "method.gate_scale=1"]),
}
SHARED = {"lora": ["dynamic_lora"]}  # arm -> other studies whose report includes it


def job_dir(arm: str, task: str, seed: int) -> Path:
    return RESULTS / f"ablation_{ARMS[arm][0]}" / "jobs" / arm / f"{task}_s{seed}"


EXTRA: list[str] = []  # --extra: overrides for every job that do not change the protocol (trainer.device=cuda)


def job(arm: str, task: str, seed: int) -> Job:
    return Job(f"{arm} {task} s{seed}", job_dir(arm, task, seed),
               (f"task={task}", f"seed={seed}", *COMMON, *TASKS[task], *ARMS[arm][1], *EXTRA))


def report(study: str) -> None:
    root = RESULTS / f"ablation_{study}"
    for arm, others in SHARED.items():
        if study in others:
            src = RESULTS / f"ablation_{ARMS[arm][0]}" / "jobs" / arm
            if src.exists():
                dst = root / "jobs" / arm
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("adapter", "checkpoints"))
    if (root / "jobs").exists():
        jobqueue.report(root / "jobs", root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names (default: all, in order)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--jobs", type=int, default=2, help="jobs at once, one torch thread each")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--results", default=None, help="where the ablation_<study>/ folders go (default bench/results)")
    ap.add_argument("--extra", default="", help="space-separated overrides added to every job, e.g. "
                    "'trainer.device=cuda' (say so in the study's README: the reference arm must share them)")
    ap.add_argument("--deadline-s", type=float, default=None, help="start no job after this many seconds")
    args = ap.parse_args()
    EXTRA.extend(args.extra.split())
    if args.results:
        global RESULTS
        RESULTS = Path(args.results).resolve()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    if args.list:
        for arm in arms:
            print(f"{arm:26s} {ARMS[arm][0]:13s} {' '.join(ARMS[arm][1])}")
        return 0
    failed = 0
    if not args.report_only:
        queue = [job(arm, task, int(seed)) for arm in arms for seed in args.seeds.split(",")
                 for task in args.tasks.split(",")]
        _, failed = jobqueue.run_queue(queue, args.jobs, args.deadline_s)
    for study in sorted({ARMS[a][0] for a in arms} | {s for a in arms for s in SHARED.get(a, [])}):
        report(study)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
