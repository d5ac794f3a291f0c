"""Time the evaluation forward of a trained adapter against the bare backbone's forward.

The trainer evaluates through `method.merged_for_eval()`: where the method can merge, each adapted layer runs
one dense matmul with a merged copy of its weight, so inference should cost what the backbone costs. This
script measures that, interleaved in one process (round-robin, so machine noise hits every configuration alike):

  backbone     the model without adapters (the denominator)
  <m>_unmerged the adapted model, adapter branch computed on every forward
  <m>_merged   the same model inside `merged_for_eval()`; the merge is timed on its own and amortized over
               one evaluation pass (`--eval-batches`, SST-2's dev set is 7 batches of 128)

The adapters are perturbed away from their init (as after training), so merged weights are not the base ones.

  python bench/eval_time.py                 # CPU, writes bench/results/eval_time_cpu.md
  python bench/eval_time.py --quick         # tiny model, seconds: checks the script itself
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "src"))

from step_time import make_batch, method_cfg, model_spec  # noqa: E402

from lorabench import assemble  # noqa: E402
from lorabench.backbone import load_model  # noqa: E402
from lorabench.budget import Budget  # noqa: E402

METHODS = ("lora", "dora", "adalora", "dora_dynamic", "dynamic_lora")


def perturbed(base, spec, name: str, rank: int):
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    method = assemble.attach(model, spec, method_cfg(name), Budget(f"r{rank}", rank))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval(), method


def time_round(model, method, merged: bool, batch, n_batches: int) -> tuple[float, float]:
    """(median seconds per forward batch, seconds to merge) for one visit of an arm; merge 0 when unmerged."""
    with torch.no_grad():
        if not merged:
            return _median_forward(model, batch, n_batches), 0.0
        t0 = time.perf_counter()
        with method.merged_for_eval() as did_merge:
            merge_s = time.perf_counter() - t0
            assert did_merge, "the arm was built as mergeable"
            return _median_forward(model, batch, n_batches), merge_s


def _median_forward(model, batch, n_batches: int) -> float:
    times = []
    for _ in range(n_batches):
        t0 = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=2, help="forward batches per arm per round")
    p.add_argument("--eval-batches", type=int, default=7,
                   help="batches of one evaluation pass the merge is amortized over (SST-2 dev: 7 of 128)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.batches, args.rounds, args.seq = "tiny", 8, 1, 1, 16
    spec = model_spec(args.model)
    base = load_model(spec, num_labels=2, is_regression=False).eval()
    batch = make_batch(args.batch, args.seq, base.config.vocab_size)
    batch.pop("labels")
    arms = {"backbone": (base, None, False)}
    for name in METHODS:
        model, method = perturbed(base, spec, name, args.rank)
        arms[f"{name}_unmerged"] = (model, method, False)
        if method.merge_for_eval and method.mergeable:
            arms[f"{name}_merged"] = (model, method, True)
    forward: dict[str, list[float]] = {k: [] for k in arms}
    merge: dict[str, list[float]] = {k: [] for k in arms}
    t0 = time.perf_counter()
    for r in range(args.rounds + 1):  # round 0 warms up and is dropped
        for key, (model, method, merged) in arms.items():
            f, m = time_round(model, method, merged, batch, args.batches)
            if r > 0 or args.rounds == 0:
                forward[key].append(f)
                merge[key].append(m)
        if r > 0:
            print(f"round {r}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f}" for k, v in forward.items()),
                  file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    fwd = {k: statistics.median(v) for k, v in forward.items()}
    mrg = {k: statistics.median(v) for k, v in merge.items()}
    lines = ["# Eval forward per batch, ÷ the bare backbone (cpu, fp32)", "",
             f"Command: `python bench/eval_time.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"Model {args.model}, batch {args.batch}, seq {args.seq}, rank {args.rank} on all six maps; "
             f"{args.rounds} interleaved rounds (after one warm-up round), each timing {args.batches} forward "
             f"batch(es) per arm; medians over all timed batches. Merged arms enter `merged_for_eval()` once per "
             f"round: the merge is timed on its own and amortized over one evaluation pass of "
             f"{args.eval_batches} batches in the last column. torch {torch.__version__}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; whole bench {seconds:.0f} s. "
             f"dynamic_lora's token gate depends on the input, so it cannot merge.", "",
             "| config | forward ms/batch | ÷ backbone | merge ms | ÷ backbone, merge amortized |",
             "|---|---|---|---|---|"]
    for key in arms:
        amortized = (fwd[key] + mrg[key] / args.eval_batches) / fwd["backbone"]
        lines.append(f"| {key} | {fwd[key] * 1e3:.0f} | {fwd[key] / fwd['backbone']:.3f} | "
                     f"{mrg[key] * 1e3:.1f} | {amortized:.3f} |")
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        out = Path(args.out) if args.out else REPO / "bench" / "results" / "eval_time_cpu.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
