"""Every local GLUE task learns: lorabench's LoRA run vs an independent HF PEFT LoRA loop, with baselines.

Two arms per task and seed, on the same tokenized training subset and dev set:

- `lorabench`: the product path, `lorabench.run.run_job` on the composed Hydra config (what
  `python -m train method=lora task=<t> trainer.max_train_samples=N trainer.epochs=E seed=S` runs);
- `peft`: plain transformers + HF PEFT: `AutoModelForSequenceClassification.from_pretrained`, `LoraConfig` on the
  same six maps with the same r / alpha / dropout, the head through PEFT's own `modules_to_save` (the classifier,
  and the pooler wherever lorabench trains it: the same head treatment), and a training loop written here with
  torch's AdamW and transformers' linear warmup schedule. It shares with the other arm the data (tokenized subset
  and the seeded batch order), the metric functions, and the initial weights: PEFT's A and head are set to the
  values the lorabench run starts from (B = 0 in both), so the arms differ in implementation only.

Also reported: the majority-class (classification) or mean-prediction (regression) baseline on each dev set, i.e.
what a model that learnt nothing scores. Scores are each run's last-epoch dev metric ×100, mean over seeds.

  GLUE_DIR=../shared/data/glue python bench/lora_vs_peft.py                       # six tasks, 2000 train, 3 epochs
  python bench/lora_vs_peft.py --tasks stsb --seeds 1,2 --arms lorabench,peft,lorabench_frozen_pooler

Writes bench/results/lora_vs_peft_glue.md (+ .json; `--out` to change) with the command, after every task; a
task already in that .json with the same settings, arms and seeds is kept, not rerun (an interrupted run goes on).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorabench.backbone import ModelSpec, head_parameters, load_model, load_tokenizer  # noqa: E402
from lorabench.data import BatchLoader, Collator, load_task_data, resolve_glue_dir  # noqa: E402
from lorabench.metrics import compute_metrics  # noqa: E402
from lorabench.assemble import seed_everything  # noqa: E402
from lorabench.run import run_job  # noqa: E402

TASKS = ("cola", "sst2", "mrpc", "stsb", "rte", "wnli")


def compose(task: str, seed: int, args, extra: list[str] = ()) -> dict:
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [f"task={task}", "method=lora", f"seed={seed}", f"trainer.max_train_samples={args.max_train}",
                 f"trainer.epochs={args.epochs}", f"trainer.lr={args.lr}", f"trainer.batch_size={args.batch}",
                 f"budget.rank={args.rank}", f"method.alpha={args.alpha}", f"method.dropout={args.dropout}",
                 "logger=none", "trainer.progress_bar=false", *extra]
    if args.glue_dir:
        overrides.append(f"data.glue_dir={args.glue_dir}")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_container(hydra_compose("config", overrides=overrides), resolve=True)


def lorabench_arm(task: str, seed: int, args, extra: list[str] = ()) -> dict:
    cfg = compose(task, seed, args, extra)
    out = Path(args.work_dir) / f"{task}_s{seed}_{'_'.join(extra) or 'lorabench'}".replace("=", "-")
    r = run_job(cfg, out)
    return {"history": r["history"], "last": r["last"], "trainable": r["params"]["trainable"],
            "seconds": r["timings"]["wall_seconds"]}


def peft_arm(task: str, seed: int, args, data, tokenizer, spec, model_spec) -> dict:
    import peft
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from lorabench.backbone import package_model_dir
    from lorabench.export import head_module_names

    t0 = time.perf_counter()
    # which backbone modules train with the head is lorabench's rule (here: the untouched pooler); PEFT gets the
    # same list as modules_to_save, so the two arms differ in the adapter and the loop, not in the head
    head_modules = head_module_names([n for n, _ in head_parameters(
        load_model(model_spec, spec.num_labels, spec.is_regression))])
    seed_everything(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(package_model_dir(model_spec.package)), num_labels=spec.num_labels,
        problem_type="regression" if spec.is_regression else "single_label_classification")
    targets = sorted({f"{model_spec.layer_path}.{i}.{path}" for i in range(model.config.num_hidden_layers)
                      for path in model_spec.targets.values()})
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
        modules_to_save=head_modules))
    copy_initial_weights(model, task, seed, args, spec, model_spec, len(tokenizer))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr)
    loader = BatchLoader(data.train, args.batch, Collator(tokenizer.pad_token_id), shuffle=True, seed=seed)
    total = len(loader) * args.epochs
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * total), total)
    history = []
    for epoch in range(args.epochs):
        model.train()
        loader.epoch = epoch
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        history.append({"epoch": epoch + 1, **evaluate(model, data, tokenizer, spec)})
    return {"history": history, "last": history[-1], "trainable": sum(p.numel() for _, p in params),
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def copy_initial_weights(peft_model, task: str, seed: int, args, spec, model_spec, vocab_size: int) -> None:
    """Start PEFT from the lorabench run's initial adapter A (B = 0 in both) and head, built exactly as run_job
    builds them for this seed: the arms then differ only in their implementation, not in the luck of the init,
    so a gap between them is a defect (a frozen head part, a wrong scale, a training-loop difference)."""
    from lorabench import methods
    from lorabench.budget import Budget
    from lorabench.assemble import build_adapted_model

    cfg = compose(task, seed, args)
    ours, head, method = build_adapted_model(model_spec, spec, methods.get("lora"), cfg["method"],
                                             Budget.from_dict(cfg["budget"]), seed, vocab_size)
    peft_params = dict(peft_model.named_parameters())
    for name, layer in method.layers.items():
        peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A)
        peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B)
    for name, p in head:  # PEFT trains a copy of each head module: modules_to_save.default
        module, _, leaf = name.rpartition(".")
        peft_params[f"base_model.model.{module}.modules_to_save.default.{leaf}"].copy_(p)


@torch.no_grad()
def evaluate(model, data, tokenizer, spec) -> dict:
    model.eval()
    out = {}
    for name, split in data.evals.items():
        preds, labels = [], []
        for batch in BatchLoader(split, 128, Collator(tokenizer.pad_token_id), shuffle=False):
            y = batch.pop("labels")
            logits = model(**batch).logits.float()
            preds.append(logits.squeeze(-1) if spec.is_regression else logits.argmax(-1))
            labels.append(y)
        suffix = next(s.suffix for s in spec.eval_splits if s.name == name)
        for k, v in compute_metrics(spec.metrics, torch.cat(preds).numpy(), torch.cat(labels).numpy()).items():
            out[f"eval/{k}{suffix}"] = v
    return out


def baseline(data, spec) -> dict:
    """What a model that learnt nothing scores: the train set's majority class, or its mean score."""
    train_y = np.asarray(data.train.labels)
    out = {}
    for name, split in data.evals.items():
        y = np.asarray(split.labels)
        if spec.is_regression:
            pred = np.full(len(y), train_y.mean())
        else:
            pred = np.full(len(y), np.bincount(train_y.astype(int)).argmax())
        suffix = next(s.suffix for s in spec.eval_splits if s.name == name)
        out.update({f"eval/{k}{suffix}": v for k, v in compute_metrics(spec.metrics, pred, y).items()})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="1")
    p.add_argument("--arms", default="lorabench,peft",
                   help="lorabench, peft, lorabench_frozen_pooler (model.pooler=freeze: the old head)")
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--work-dir", default=str(REPO / "runs" / "bench_lora_vs_peft"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "lora_vs_peft_glue"))
    args = p.parse_args(argv)

    from lorabench.data import load_task_spec
    import yaml

    model_spec = ModelSpec.from_dict(yaml.safe_load((REPO / "conf" / "model" / "minilm.yaml").read_text()))
    tokenizer = load_tokenizer(model_spec)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("max_train", "epochs", "rank", "alpha", "dropout", "lr", "batch")}
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    # tasks of earlier invocations stay in the table (each entry records its own settings and command line)
    record = {"tasks": dict(previous.get("tasks") or {})}
    for task in args.tasks.split(","):
        done = record["tasks"].get(task)
        if done and done.get("settings", previous.get("settings")) == settings and all(
                sorted(r["seed"] for r in done["runs"].get(arm, [])) == seeds for arm in arms):
            continue  # finished by an earlier invocation with the same settings
        spec = load_task_spec(task)
        data = load_task_data(spec, tokenizer, 128, resolve_glue_dir(args.glue_dir), None, args.max_train)
        entry = {"metric": f"eval/{spec.primary_metric}", "n_train": len(data.train), "settings": settings,
                 "argv": sys.argv[1:], "n_dev": {k: len(v) for k, v in data.evals.items()},
                 "baseline": baseline(data, spec), "runs": {}}
        for arm in arms:
            for seed in seeds:
                if arm == "lorabench":
                    r = lorabench_arm(task, seed, args)
                elif arm == "lorabench_frozen_pooler":
                    r = lorabench_arm(task, seed, args, ["model.pooler=freeze"])
                elif arm == "peft":
                    r = peft_arm(task, seed, args, data, tokenizer, spec, model_spec)
                else:
                    raise SystemExit(f"unknown arm {arm!r}")
                entry["runs"].setdefault(arm, []).append({"seed": seed, **r})
                print(f"{task} {arm} seed {seed}: {entry['metric']} = {r['last'][entry['metric']]:.4f} "
                      f"({r['seconds']:.0f} s)", flush=True)
        record["tasks"][task] = entry
        record["tasks"] = {t: record["tasks"][t] for t in TASKS if t in record["tasks"]}  # GLUE order
        out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str))
        out.with_suffix(".md").write_text(render(record, args, arms, seeds))
    out.with_suffix(".md").write_text(render(record, args, arms, seeds))
    print(render(record, args, arms, seeds))
    return 0


def render(record: dict, args, arms: list[str], seeds: list[int]) -> str:
    def score(runs, key):
        vals = [100 * r["last"][key] for r in runs]
        sd = f" ± {np.std(vals, ddof=1):.1f}" if len(vals) > 1 else ""
        return float(np.mean(vals)), f"{np.mean(vals):.1f}{sd}"

    commands = dict.fromkeys(" ".join(e.get("argv", [])) for e in record["tasks"].values())
    lines = ["# LoRA: lorabench vs HF PEFT on the local GLUE tasks (all-MiniLM-L6-v2)", "",
             "Commands (GLUE_DIR=../shared/data/glue):", "",
             *[f"    python bench/lora_vs_peft.py {c}".rstrip() for c in commands], "",
             f"LoRA r={args.rank}, alpha {args.alpha}, dropout {args.dropout} on all six maps of every block; lr "
             f"{args.lr}, batch {args.batch}, {args.epochs} epochs, warmup 6%, weight decay 0.01 on matrices, "
             f"max length 128; a fixed random training subset of the size in the `train` column (`--max-train`; "
             f"the whole set when smaller), full dev sets; seeds {', '.join(map(str, seeds))}. Both arms start "
             f"from the same adapter A (B = 0) and head. Scores: last-epoch dev metric ×100 (mean ± std over "
             f"seeds). Baseline: majority class / mean prediction of the training labels.", "",
             "| task | metric | train | dev | baseline | " + " | ".join(arms) + " | lorabench − peft |",
             "|---|---|---|---|---|" + "---|" * len(arms) + "---|"]
    for task, e in record["tasks"].items():
        key = e["metric"]
        cells, means = [], {}
        for arm in arms:
            means[arm], text = score(e["runs"][arm], key)
            cells.append(text)
        diff = f"{means['lorabench'] - means['peft']:+.1f}" if {"lorabench", "peft"} <= set(means) else ""
        lines.append(f"| {task} | {key.split('/', 1)[1]} | {e['n_train']} | {sum(e['n_dev'].values())} | "
                     f"{100 * e['baseline'][key]:.1f} | " + " | ".join(cells) + f" | {diff} |")
    lines += ["", "Dev metric at each evaluation (first seed; the lorabench run evaluates as `python -m train` does, "
              "every epoch or, with epochs over 200 steps, every tenth of the run: `trainer.eval_every=auto`):", ""]
    for task, e in record["tasks"].items():
        key = e["metric"]
        per = "; ".join(f"{arm} " + " / ".join(f"{100 * h[key]:.1f}" for h in e["runs"][arm][0]["history"])
                        for arm in arms)
        lines.append(f"- {task}: {per}")
    secs = sum(r["seconds"] for e in record["tasks"].values() for runs in e["runs"].values() for r in runs)
    lines += ["", f"Total wall time of the runs: {secs / 60:.0f} min on this machine."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
