"""`+plan=true`'s estimate against the real run, on the default model (MiniLM), for a few jobs.

For each job: its plan (lorabench.plan.plan_job, what `python -m train <job> +plan=true` computes: counted steps,
steps timed on this machine, evaluations, set-up), then the job itself as a user runs it (`python -m train <job>`
in a fresh process), and the times its results.json records. Plan and run share one cache directory, as they do
for a user (the plan tokenizes, the run reads the tokenization cache).

  python bench/plan_vs_actual.py                 # all jobs; writes bench/results/plan_vs_actual_cpu.{md,json}
  python bench/plan_vs_actual.py --jobs 0,1      # some of them (results merge into the same files)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

COMMON = ["trainer.max_steps=60", "logger=none", "trainer.progress_bar=false"]
JOBS = [
    ["method=lora", "task=rte"],
    ["method=dora_dynamic", "task=rte"],
    ["method=adalora", "task=mrpc"],
    ["method=lora", "task=sst2"],  # 10 evaluations: eval_every=auto is a tenth of the run on SST-2's long epochs
]


def compose(overrides: list[str], glue_dir: str) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(hydra_compose("config", overrides=[*overrides, f"data.glue_dir={glue_dir}"]),
                                      resolve=True)


def measure(index: int, glue_dir: str, work: Path, cache: Path) -> dict:
    from lorabench.plan import plan_job

    job = JOBS[index]
    os.environ["LORABENCH_CACHE"] = str(cache)
    plan = plan_job(compose(job + COMMON, glue_dir), name=" ".join(job))
    run_dir = work / f"job{index}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "train", *job, *COMMON, f"hydra.run.dir={run_dir}"], cwd=REPO,
                          env={**os.environ, "GLUE_DIR": glue_dir}, capture_output=True, text=True)
    process_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{proc.stderr[-3000:]}")
    r = json.loads((run_dir / "results.json").read_text())
    t = r["timings"]
    return {"job": " ".join(job), "steps": plan.steps, "actual_steps": t["steps"],
            "evaluations": plan.evaluations, "actual_evaluations": len(r["history"]),
            "plan_seconds_per_step": plan.seconds_per_step, "actual_seconds_per_step": t["seconds_per_step"],
            "plan_train_eval": plan.train_seconds + plan.eval_seconds,
            "actual_train_eval": t["train_seconds"] + t["eval_seconds"],
            "plan_total": plan.estimate_seconds, "actual_wall": t["wall_seconds"],
            "process_seconds": process_seconds, "length": plan.train_length,
            "load_average": os.getloadavg()[0]}


def render(rows: list[dict], argv: list[str]) -> str:
    commands = ", ".join(f"`python bench/plan_vs_actual.py {a}`".replace(" `", "`") for a in argv)
    lines = ["# `+plan=true` estimate vs the real run (cpu, default model)", "",
             f"Commands: {commands} (each job: its plan, then "
             f"`python -m train <job> {' '.join(COMMON)}` in a fresh process; the machine's background jobs "
             "paused).", "",
             "Estimate = set-up (data from the tokenization cache + model build) + steps × s/step + evaluations × "
             "s/evaluation; actual = results.json's `wall_seconds` (the job from its start to results.json; the "
             "process start, importing torch and transformers, is the last column). Ratio = estimate / actual.", "",
             "| job | steps (plan / run) | evals (plan / run) | padded length | s/step plan | s/step run | "
             "train+eval plan (s) | train+eval run (s) | ratio | total plan (s) | wall run (s) | ratio | "
             "process (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['job']} | {r['steps']} / {r['actual_steps']} | {r['evaluations']} / {r['actual_evaluations']} | "
            f"{r['length']} | {r['plan_seconds_per_step']:.2f} | {r['actual_seconds_per_step']:.2f} | "
            f"{r['plan_train_eval']:.0f} | {r['actual_train_eval']:.0f} | "
            f"{r['plan_train_eval'] / r['actual_train_eval']:.2f} | {r['plan_total']:.0f} | {r['actual_wall']:.0f} | "
            f"{r['plan_total'] / r['actual_wall']:.2f} | {r['process_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", default=",".join(str(i) for i in range(len(JOBS))))
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "data" / "glue"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "plan_vs_actual_cpu.md"))
    p.add_argument("--cache", default=None, help="cache directory shared by plans and runs (default: a new one)")
    args = p.parse_args(argv)
    out = Path(args.out)
    store = out.with_suffix(".json")
    saved = json.loads(store.read_text()) if store.exists() else {"rows": {}, "argv": []}
    cache = Path(args.cache or tempfile.mkdtemp(prefix="lorabench-plan-bench-"))
    with tempfile.TemporaryDirectory() as work:
        for i in (int(j) for j in args.jobs.split(",")):
            saved["rows"][str(i)] = measure(i, str(Path(args.glue_dir).resolve()), Path(work), cache)
            print(json.dumps(saved["rows"][str(i)]), file=sys.stderr)
    saved["argv"] = sorted(set(saved["argv"]) | {" ".join(argv)})
    rows = [saved["rows"][k] for k in sorted(saved["rows"], key=int)]
    text = render(rows, saved["argv"])
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    store.write_text(json.dumps(saved, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
