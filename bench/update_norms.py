"""How large an update did each run learn? The merged ΔW = W_merged − W0 of every adapted matrix, summarized.

    python bench/update_norms.py RUN_DIR [RUN_DIR ...] [--per-matrix]

For every finished run directory (its `adapter/` must be on disk: the committed results leave the weights out)
prints the method, the task, the mean over adapted matrices of ‖ΔW‖₂ (spectral) and ‖ΔW‖_F, and the largest
‖ΔW‖₂. Two methods at the same budget and a similar score can still differ by a large factor here; this is
how bench/results/adalora_short_runs/ found that AdaLoRA learns a 4–6× smaller update than LoRA in a short run.

Methods that cannot merge (an input-dependent gate: dynamic_lora) are reported as such and skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorabench.errors import ConfigError  # noqa: E402
from lorabench.export import load_run, merged_weights  # noqa: E402


@torch.no_grad()
def update_norms(run_dir: Path) -> tuple[str, str, dict[str, tuple[float, float]]]:
    """(method, task, {adapted matrix: (‖ΔW‖₂, ‖ΔW‖_F)}) of one finished run."""
    loaded = load_run(run_dir)
    merged = merged_weights(loaded.method, loaded.model, loaded.head_param_names)
    out = {}
    for name in loaded.method.layers:
        delta = (merged[f"{name}.weight"] - loaded.base_weights0[name]).double()
        out[name] = (torch.linalg.matrix_norm(delta, 2).item(), delta.norm().item())
    return loaded.method.name, loaded.task_spec.name, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--per-matrix", action="store_true", help="also print every matrix's norms")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one table on stdout, not a loading bar per run
    print("| run | method | task | mean ‖ΔW‖₂ | mean ‖ΔW‖_F | max ‖ΔW‖₂ |")
    print("|---|---|---|---|---|---|")
    failed = 0
    for run_dir in args.run_dirs:
        try:
            method, task, norms = update_norms(run_dir)
        except ConfigError as e:
            print(f"| {run_dir} | — | — | skipped: {e} | | |")
            failed += 1
            continue
        spec = [s for s, _ in norms.values()]
        fro = [f for _, f in norms.values()]
        print(f"| {run_dir} | {method} | {task} | {statistics.mean(spec):.3f} | {statistics.mean(fro):.3f} "
              f"| {max(spec):.3f} |")
        if args.per_matrix:
            for name, (s, f) in norms.items():
                print(f"|   {name} | | | {s:.3f} | {f:.3f} | |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
