"""How the cost of a training step grows: step time and peak memory of LoRA and of the slowest method (DoRA, by
bench/results/step_time_cpu.md) against sequence length, batch size and backbone size, each against the floor of
the same shape.

One factor at a time around a centre (MiniLM, batch 16, sequence 128):
  seq    32, 64, 128, 256            (MiniLM, batch 16)
  batch  8, 16, 32, 64               (MiniLM, sequence 128)
  model  tiny, minilm, bert_base_random (batch 16, sequence 128; the last a BERT-base-sized random-init config)

Every shape is bench/step_time.py's measurement (`run_seq`): the configurations of that shape built side by side,
their training steps timed interleaved in rounds, each step's time divided by the floor's step of the same round
(the frozen backbone's forward + activation-only backward: the least any adapter can cost), and peak memory read
from a fresh process per configuration. The ratio's trend along an axis says whether the adapters' overhead grows
faster than the backbone's (a rising ratio) or slower (a falling one).

  python bench/scaling.py --axis seq --no-memory        # timing only (a quiet machine), one axis at a time
  python bench/scaling.py --axis seq --memory-only      # peak memory only (a process per configuration)
  python bench/scaling.py --axis model --values bert_base_random    # some shapes of an axis
  python bench/scaling.py --quick                       # tiny model, two short shapes: a check of the script
Every part merges into bench/results/scaling_cpu.{md,json} (a shape measured again replaces its numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import step_time  # noqa: E402  (the timing machinery: configurations, interleaved rounds, memory children)

CENTRE = {"model": "minilm", "batch": 16, "seq": 128}
AXES = {
    "seq": [{"seq": s} for s in (32, 64, 128, 256)],
    "batch": [{"batch": b} for b in (8, 16, 32, 64)],
    "model": [{"model": m} for m in ("tiny", "minilm", "bert_base_random")],
}
DEFAULT_METHODS = "lora,dora"


def measure_shape(shape: dict, args) -> list[dict]:
    """step_time.run_seq for one shape: rows of floor and each method (timings with ratios to the floor, and/or
    peak memory)."""
    run_args = argparse.Namespace(**vars(args))
    for key, value in {**CENTRE, **shape}.items():
        setattr(run_args, key, value)
    run_args.only = args.methods
    rows = step_time.run_seq(run_args)
    for r in rows:
        r.update({"model": run_args.model, "batch": run_args.batch})
    return rows


def merge_shape(old: list[dict], new: list[dict]) -> list[dict]:
    """A shape's rows: the new part's values over the old ones (a timing part and a memory part make one row)."""
    merged = {r["config"]: dict(r) for r in old}
    for r in new:
        merged.setdefault(r["config"], {}).update(r)
    return list(merged.values())


def _verdict(change: float, threshold: float) -> str:
    return ("faster than the backbone's" if change > threshold else
            "slower than the backbone's" if change < -threshold else "in step with the backbone's")


def trend(rows: list[dict], key: str, values: list[str], methods: list[str],
          faster: list[str] | None = None) -> list[str]:
    """One line per method: how its step-time ratio and its memory above the floor move from the first value of
    the axis to the last, against the floor's own growth. Appends to `faster` what grows faster than the floor."""
    by = {(str(r[key]), r["config"]): r for r in rows}
    first, last = values[0], values[-1]
    out = []
    f0, f1 = by.get((first, "floor"), {}), by.get((last, "floor"), {})
    growth = (f"the floor's step grows ×{f1['median_ms'] / f0['median_ms']:.1f}" if "median_ms" in f0 and
              "median_ms" in f1 else "")
    for m in methods:
        a, b = by.get((first, m), {}), by.get((last, m), {})
        parts = []
        if "to_floor" in a and "to_floor" in b:
            # the overhead is ratio − 1; a change of its ratio by more than 5% of the step is read as a trend
            verdict = _verdict(b["to_floor"] - a["to_floor"], 0.05)
            parts.append(f"time ÷ floor {a['to_floor']:.2f} → {b['to_floor']:.2f} (overhead grows {verdict})")
            if verdict.startswith("faster") and faster is not None:
                faster.append(f"{m} step time with {key}")
        if "peak_mb" in a and "peak_mb" in b and "peak_mb" in f0 and "peak_mb" in f1:
            share0 = (a["peak_mb"] - f0["peak_mb"]) / f0["peak_mb"]
            share1 = (b["peak_mb"] - f1["peak_mb"]) / f1["peak_mb"]
            verdict = _verdict(share1 - share0, 0.03)
            parts.append(f"memory above the floor {a['peak_mb'] - f0['peak_mb']:+.0f} → "
                         f"{b['peak_mb'] - f1['peak_mb']:+.0f} MB, {100 * share0:.0f}% → {100 * share1:.0f}% of the "
                         f"floor's peak (grows {verdict})")
            if verdict.startswith("faster") and faster is not None:
                faster.append(f"{m} memory with {key} ({100 * share0:.0f}% → {100 * share1:.0f}% of the floor)")
        if parts:
            out.append(f"- {m}, {key} {first} → {last}: " + "; ".join(parts) + ".")
    if growth and out:
        out.insert(0, f"From {key} {first} to {last} {growth}.")
    return out


def render(results: dict, commands: dict, order: list[str]) -> str:
    lines = ["# How step cost grows with sequence length, batch and backbone (cpu, fp32)", "",
             "Commands (parts merged into this file; the timing parts ran while the shared machine was otherwise "
             "as quiet as it gets, with one torch thread, which a busy neighbour process slows least):", ""]
    lines += [f"- `{c}`" for c in commands]
    meta = results.get("_meta", {})
    lines += ["", f"Centre: {CENTRE['model']}, batch {CENTRE['batch']}, sequence {CENTRE['seq']}; rank 8 on all six "
              f"maps of every block, adapter dropout 0, backbone dropout as configured (0.1); "
              f"{meta.get('rounds', '?')} interleaved rounds of one step after one warm-up step; torch "
              f"{meta.get('torch', '?')}, {meta.get('cpus', '?')} CPUs, {meta.get('threads', '?')} torch "
              f"thread{'s' if meta.get('threads') != 1 else ''} for the timings.", "",
              "`÷ floor`: a method's step time over the floor's (frozen backbone, forward + activation-only "
              "backward) of the same shape, median of the per-round ratios (IQR in brackets). Memory: peak RSS of a "
              "fresh process that builds the configuration and runs three steps; `+MB` is what it holds above the "
              "floor's process.", ""]
    faster: list[str] = []
    for axis, label in (("seq", "sequence length"), ("batch", "batch size"), ("model", "backbone")):
        if not results.get(axis):
            continue
        rows = [r for shape in results[axis].values() for r in shape]
        present = {r["config"] for r in rows} - {"floor"}
        methods = [m for m in order if m in present] + sorted(present - set(order))
        key = {"seq": "seq", "batch": "batch", "model": "model"}[axis]
        lines += [f"## {label}", "",
                  "| " + key + " | floor ms/step | " + " | ".join(
                      f"{m} ÷ floor" for m in methods) + " | floor peak MB | " + " | ".join(
                      f"{m} peak MB (+MB)" for m in methods) + " |",
                  "|---" * (3 + 2 * len(methods)) + "|"]
        values = [str(v[key]) for v in AXES[axis]]
        for value in [v for v in values if v in {str(r[key]) for r in rows}]:
            by = {r["config"]: r for r in rows if str(r[key]) == value}
            floor = by["floor"]
            ratio = [f"{by[m]['to_floor']:.2f} ({by[m]['to_floor_iqr'][0]:.2f}–{by[m]['to_floor_iqr'][1]:.2f})"
                     if "to_floor" in by.get(m, {}) else "" for m in methods]
            mem = [f"{by[m]['peak_mb']:.0f} ({by[m]['peak_mb'] - floor['peak_mb']:+.0f})"
                   if "peak_mb" in by.get(m, {}) and "peak_mb" in floor else "" for m in methods]
            floor_ms = f"{floor['median_ms']:.0f}" if "median_ms" in floor else ""
            floor_mb = f"{floor['peak_mb']:.0f}" if "peak_mb" in floor else ""
            lines.append(f"| {value} | {floor_ms} | " + " | ".join(ratio) + f" | {floor_mb} | " +
                         " | ".join(mem) + " |")
        lines += [""] + trend(rows, key, [v for v in values if v in {str(r[key]) for r in rows}], methods,
                              faster) + [""]
    lines += ["## Where the adapters' overhead grows faster than the backbone's", "",
              "Over each axis's range (first value to last; a time ratio that moves by more than 0.05, a memory "
              "share by more than 3 points): " + ("; ".join(faster) if faster else "nowhere") + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step_time.add_config_arguments(p)
    p.add_argument("--axis", default="all", choices=[*AXES, "all"])
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods (the floor is always kept)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--memory-only", action="store_true", help="peak memory only (no timing)")
    p.add_argument("--values", default=None, help="comma-separated values of the axis to measure (default: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the timed steps (default 1: on a shared machine another busy process "
                        "stalls a 2-thread step far more than it slows a 1-thread one)")
    p.add_argument("--quick", action="store_true", help="tiny model, two short shapes, no memory: a check")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the stored .json")
    p.add_argument("--out", default=str(BENCH / "results" / "scaling_cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        CENTRE.update(model="tiny", batch=4, seq=16)
        AXES.clear()
        AXES["seq"] = [{"seq": 8}, {"seq": 16}]
        args.rounds, args.memory, args.axis = 1, False, "seq"
    axes = list(AXES) if args.axis == "all" else [args.axis]
    out = Path(args.out)
    store = out.with_suffix(".json")
    saved = json.loads(store.read_text()) if store.exists() and not args.quick else {}
    results, commands = saved.get("results", {}), saved.get("commands", [])
    wanted = set(args.values.split(",")) if args.values else None
    for axis in [] if args.render else axes:
        t0 = time.perf_counter()
        for shape in AXES[axis]:
            value = str(shape[axis])
            if wanted is None or value in wanted:
                stored = results.setdefault(axis, {})
                stored[value] = merge_shape(stored.get(value, []), measure_shape(shape, args))
        print(f"[{axis}] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    command = "python bench/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if not args.render:
        commands = [c for c in commands if c != command] + [command]
    meta = saved.get("meta", {})
    if not (args.memory_only or args.render):  # what the timings were measured with
        meta = {"rounds": args.rounds, "torch": torch.__version__, "cpus": len(os.sched_getaffinity(0)),
                "threads": torch.get_num_threads(), "machine": platform.machine()}
    text = render({**results, "_meta": meta}, commands, args.methods.split(","))
    print(text)
    if not args.quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        store.write_text(json.dumps({"results": results, "commands": commands, "meta": meta}, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
