"""Where a training step's time goes: torch.profiler over a few steps of one configuration of step_time.py.

Prints the operators by self time (CPU, or CUDA on a GPU) for each configuration asked for, so the overhead of
a method over the floor can be read op by op.

  python bench/profile_step.py lora floor                # seq 64, batch 32, MiniLM, 3 profiled steps
  python bench/profile_step.py adalora --seq 128 --rows 30
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import add_config_arguments, make_trainer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="configurations of step_time.py (floor, lora, peft_lora, ...)")
    add_config_arguments(p)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for config in args.configs:
        tr, batch = make_trainer(config, args)
        tr.train_step([batch])  # warm-up: allocator, lazy optimizer state
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                tr.train_step([batch])
            if cuda:
                torch.cuda.synchronize()
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / args.steps
        print(f"\n## {config}: seq {args.seq}, batch {args.batch}, {args.steps} steps, "
              f"self CPU total {total:.0f} ms/step\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
        del tr
    return 0


if __name__ == "__main__":
    sys.exit(main())
