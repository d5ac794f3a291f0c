"""The headline command's real-run speed: seconds per optimizer step from results.json, as users run it.

Each arm is the real command line (`python -m train ...`) in its own process on the real data; the number is
`timings.seconds_per_step` of its results.json (training time only: evaluation and setup excluded). Arms:

  dora_dynamic      python -m train method=dora_dynamic task=sst2 trainer.max_steps=200   (adapter dropout 0.1)
  lora_dropout      the same with method=lora method.dropout=0.1 (LoRA at DoRA-dynamic's dropout)
  lora              the same with method=lora (its default dropout 0), for reference

Runs go one after the other, the arms alternating when --rounds > 1 (a slow phase of the machine then hits every
arm). Needs the GLUE data (GLUE_DIR or --glue-dir).

  GLUE_DIR=../shared/data/glue python bench/headline_speed.py          # bench/results/headline_speed_cpu.md
  python bench/headline_speed.py --arms dora_dynamic,lora_dropout --rounds 2 --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

ARMS = {
    "dora_dynamic": ["method=dora_dynamic"],
    "lora_dropout": ["method=lora", "method.dropout=0.1"],
    "lora": ["method=lora"],
}


def command(arm: str, args) -> list[str]:
    return ["python", "-m", "train", *ARMS[arm], f"task={args.task}", f"trainer.max_steps={args.steps}",
            "logger=none", *args.extra]


def run_arm(arm: str, args, run_dir: Path) -> dict:
    from step_time import wait_for_quiet

    wait_for_quiet(args.quiet_wait)
    cmd = command(arm, args) + ["trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    if args.glue_dir:
        cmd.append(f"data.glue_dir={args.glue_dir}")
    print(f"[headline] {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=REPO, capture_output=True, text=True)
    results = run_dir / "results.json"
    if proc.returncode != 0 or not results.exists():
        raise SystemExit(f"headline_speed: {arm} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(results.read_text())
    t = r["timings"]
    print(f"[headline] {arm}: {t['seconds_per_step']:.3f} s/step over {t['steps']} steps", file=sys.stderr)
    return {"seconds_per_step": t["seconds_per_step"], "train_seconds": t["train_seconds"], "steps": t["steps"],
            "data_fraction": t.get("data_fraction"), "eval_seconds": t.get("eval_seconds"),
            "dropout": r.get("config", {}).get("method", {}).get("dropout")}


def render(data: dict) -> str:
    arms = data["arms"]
    base = arms.get("lora_dropout") or next(iter(arms.values()))
    lines = [f"# The headline command's real-run speed ({data['device']})", "",
             f"Command: `python bench/headline_speed.py {' '.join(data['argv'])}`", "",
             f"Each arm below is one `python -m train` process on the real {data['task'].upper()} data (model minilm, "
             f"batch 32, the default trainer), {data['rounds']} run(s) per arm, alternating; s/step is "
             "`timings.seconds_per_step` of its results.json (training only, evaluation excluded), the median over "
             f"the runs. torch {data['torch']}, {data['cpus']} CPUs.", "",
             "| arm | command | adapter dropout | s/step | ÷ LoRA at the same dropout | runs (s/step) |",
             "|---|---|---|---|---|---|"]
    for arm, entry in arms.items():
        per = [r["seconds_per_step"] for r in entry["runs"]]
        med = statistics.median(per)
        ratio = med / statistics.median([r["seconds_per_step"] for r in base["runs"]])
        dropout = entry["runs"][0]["dropout"]
        lines.append(f"| {arm} | `{' '.join(entry['command'])}` | {dropout} | {med:.3f} | {ratio:.2f} | "
                     f"{', '.join(f'{v:.3f}' for v in per)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="dora_dynamic,lora_dropout,lora")
    p.add_argument("--task", default="sst2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"))
    p.add_argument("--work-dir", default=None, help="where the runs go (default: a temporary directory)")
    p.add_argument("--out", default=None, help="default bench/results/headline_speed_cpu.md")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every arm")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each run wait up to this many seconds for other processes to leave the CPU")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"headline_speed: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="headline_speed_"))
    data = {"argv": list(sys.argv[1:] if argv is None else argv), "task": args.task, "rounds": args.rounds,
            "device": device, "torch": torch.__version__, "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "arms": {a: {"command": command(a, args), "runs": []} for a in arms}}
    for k in range(args.rounds):
        for arm in arms:
            data["arms"][arm]["runs"].append(run_arm(arm, args, work / f"{arm}_r{k + 1}"))
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"headline_speed_{device}.md"
    text = render(data)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
