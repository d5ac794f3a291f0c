"""Accuracy check: lorabench's LoRA vs HF PEFT's LoRA through the same trainer, data and seed.

Both arms share everything but the adapter implementation: the same tokenized subset, batch order, task head
init, optimizer, schedule and evaluation (lorabench's Trainer). Each arm initialises its own adapter under the
same seed (PEFT with its own init code), as a user switching libraries would see it.

  GLUE_DIR=../shared/data/glue python bench/lora_vs_peft.py                 # SST-2, 4000 train, 1 epoch
  python bench/lora_vs_peft.py --task rte --max-train 1000 --epochs 2

Writes bench/results/lora_vs_peft_<task>.md (+ .json) with both dev metrics, wall times and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorabench import methods  # noqa: E402
from lorabench.backbone import ModelSpec, find_targets, freeze_backbone, load_model, load_tokenizer  # noqa: E402
from lorabench.budget import Budget  # noqa: E402
from lorabench.data import BatchLoader, Collator, load_task_data, load_task_spec, resolve_glue_dir  # noqa: E402
from lorabench.run import make_evaluator, seed_everything  # noqa: E402
from lorabench.training.trainer import Trainer, TrainerConfig  # noqa: E402


def run_arm(arm: str, args, spec, data, tokenizer, model_spec) -> dict:
    seed_everything(args.seed)
    model = load_model(model_spec, spec.num_labels, spec.is_regression, vocab_size=len(tokenizer))
    head = freeze_backbone(model)
    budget = Budget("bench", args.rank)
    targets = find_targets(model, model_spec, budget.target_modules)
    seed_everything(args.seed)
    if arm == "lorabench":
        m = methods.attach(model, model_spec, {"name": "lora", "alpha": args.alpha, "dropout": args.dropout}, budget)
        params = list(m.named_trainable_parameters()) + head
    else:
        import peft

        cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
                              target_modules=[t.name.split(".", 1)[1] for t in targets])
        model = peft.get_peft_model(model, cfg)
        for n, p in model.named_parameters():  # the head trains in both arms (PEFT froze it)
            if any(n.endswith(h) for h, _ in head):
                p.requires_grad_(True)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_train = sum(p.numel() for _, p in params)
    collate = Collator(tokenizer.pad_token_id)
    train_loader = BatchLoader(data.train, args.batch, collate, shuffle=True, seed=args.seed)
    eval_loaders = {k: BatchLoader(v, 128, collate, shuffle=False) for k, v in data.evals.items()}
    ref: list = []
    tcfg = TrainerConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch, warmup_ratio=args.warmup_ratio,
                         weight_decay=args.weight_decay, progress_bar=True, log_every=10**9)
    tr = Trainer(tcfg, model, params, train_loader, make_evaluator(spec, eval_loaders, ref), spec.primary_metric,
                 head_param_names=[n for n, _ in head] if arm == "lorabench" else
                 [n for n, _ in params if "lora_" not in n])
    ref.append(tr)
    t0 = time.perf_counter()
    fit = tr.fit()
    return {"arm": arm, "trainable_params": n_train, "last": fit.last, "best": fit.best,
            "train_seconds": fit.train_seconds, "eval_seconds": fit.eval_seconds,
            "wall_seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default="minilm")
    p.add_argument("--max-train", type=int, default=4000)
    p.add_argument("--max-eval", type=int, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--arms", default="lorabench,peft")
    p.add_argument("--glue-dir", default=None)
    args = p.parse_args(argv)

    spec = load_task_spec(args.task)
    model_spec = ModelSpec.from_dict(yaml.safe_load((REPO / "conf" / "model" / f"{args.model}.yaml").read_text()))
    tokenizer = load_tokenizer(model_spec)
    data = load_task_data(spec, tokenizer, args.max_seq_length, resolve_glue_dir(args.glue_dir), None,
                          args.max_train, args.max_eval)
    rows = [run_arm(arm, args, spec, data, tokenizer, model_spec) for arm in args.arms.split(",")]
    key = f"eval/{spec.primary_metric}"
    lines = [f"# LoRA: lorabench vs HF PEFT on {args.task} ({args.model})", "",
             f"Command: `python bench/lora_vs_peft.py {' '.join(sys.argv[1:])}`", "",
             f"{len(data.train)} training examples, {', '.join(f'{k} {len(v)}' for k, v in data.evals.items())} "
             f"dev examples; r={args.rank} on all six maps, alpha {args.alpha}, dropout {args.dropout}, lr {args.lr}, "
             f"batch {args.batch}, {args.epochs} epoch(s), warmup ratio {args.warmup_ratio}, weight decay "
             f"{args.weight_decay}, max length {args.max_seq_length}, seed {args.seed}. Same trainer and data.", "",
             f"| arm | trainable params | last {key} | best {key} | train s | eval s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['trainable_params']:,} | {r['last'][key]:.4f} | {r['best'][key]:.4f} | "
                     f"{r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    if len(rows) == 2:
        diff = 100 * (rows[0]["last"][key] - rows[1]["last"][key])
        lines += ["", f"Difference (last, points): {diff:+.2f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = REPO / "bench" / "results" / f"lora_vs_peft_{args.task}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
