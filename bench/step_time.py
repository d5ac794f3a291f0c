"""Time one training step of every method against the backbone's own floor and against HF PEFT.

A step = forward + backward + optimizer + the method's hooks, through lorabench's real Trainer step
(`Trainer.train_step`), so AMP, clipping and hooks are what a run pays. Configurations, all on the same
backbone, batch, sequence length and target maps, timed interleaved in one process (round-robin, so machine
noise hits every configuration alike) and reported as ratios:

  floor       frozen backbone, gradient flowing to the input embeddings: forward + activation-only backward,
              the least any adapter method can cost
  head_only   frozen backbone, only the task head trains (forward + head backward)
  full_ft     every weight trains
  <method>    each registered lorabench method at the budget's rank
  peft_*      HF PEFT's LoRA, DoRA and AdaLoRA with the same targets, rank and alpha

Every configuration runs at each adapter dropout asked for (default 0 and 0.1: the common case, the PEFT arms
with the same dropout as ours), one table per dropout and sequence length. Peak memory is the peak RSS (CPU) or
peak allocated CUDA memory of a fresh subprocess that runs only that configuration, so the numbers don't mix.

  python bench/step_time.py                       # CPU, seq 64 and 128, dropout 0 and 0.1: bench/results/step_time_cpu.md
  python bench/step_time.py --adapter-dropout 0.1 --seqs 64 --out part.md       # one part of it
  python bench/step_time.py --merge a.json b.json --out all.md                  # parts (each with its command) as one
  python bench/step_time.py --device cuda --precision bf16 --batch 32   # on a GPU
  python bench/step_time.py --quick               # tiny model, seconds: checks the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lorabench import assemble, methods  # noqa: E402
from lorabench.backbone import ModelSpec, freeze_backbone, head_parameters, load_model, load_tokenizer  # noqa: E402
from lorabench.budget import Budget  # noqa: E402
from lorabench.data import BatchLoader, Collator, TokenizedSplit  # noqa: E402
from lorabench.training.hooks import TrainerHook  # noqa: E402
from lorabench.training.trainer import Trainer, TrainerConfig, peak_memory_mb  # noqa: E402

import yaml  # noqa: E402

PEFT_OF = {"lora": "peft_lora", "dora": "peft_dora", "adalora": "peft_adalora"}
TOTAL_STEPS = 1000  # schedules see a long run; timed steps sit inside it


def model_spec(name: str) -> ModelSpec:
    return ModelSpec.from_dict(yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text()))


def method_cfg(name: str) -> dict:
    return yaml.safe_load((REPO / "conf" / "method" / f"{name}.yaml").read_text())


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab, 20000), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


class PeftAdaLoraHook(TrainerHook):
    """PEFT's AdaLoRA schedule as its docs prescribe: update_and_allocate after optimizer.step."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def after_optimizer_step(self, state):
        self.peft_model.base_model.update_and_allocate(state.step)


class FloorModel(nn.Module):
    """The frozen backbone with the embedding output requiring grad: backward flows through every layer's
    activations but computes no weight gradient. One dummy trainable scalar lets the optimizer step run."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.dummy = nn.Parameter(torch.zeros(()))
        emb = model.base_model.embeddings
        emb.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))

    def forward(self, **batch):
        out = self.model(**batch)
        out.loss = out.loss + 0.0 * self.dummy
        return out


def build(config: str, args) -> tuple[nn.Module, list, list]:
    """(model, named trainable params, hooks) for one configuration."""
    spec = model_spec(args.model)
    tok_len = args.vocab
    torch.manual_seed(0)
    model = load_model(spec, 2, False, vocab_size=tok_len)
    if args.model_dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = args.model_dropout
    budget = Budget("bench", args.rank)
    if config == "floor":
        fm = FloorModel(model)
        return fm, [("dummy", fm.dummy)], []
    if config == "head_only":
        head = freeze_backbone(model)
        return model, head, []
    if config == "full_ft":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, list(model.named_parameters()), []
    if config.startswith("peft_"):
        import peft

        head = freeze_backbone(model)
        from lorabench.export import head_module_names

        head_names = head_module_names([n for n, _ in head])  # full paths: the pooler is bert.pooler.dense
        from lorabench.backbone import find_targets

        targets = [t.name.split(".", 1)[1] for t in find_targets(model, spec, budget.target_modules)]
        ours = {"peft_lora": "lora", "peft_dora": "dora", "peft_adalora": "adalora"}[config]
        # same alpha as our method of the same name (LoRA's while that method is not registered)
        alpha = float(method_cfg(ours if ours in methods.names() else "lora").get("alpha", 16))
        if config == "peft_adalora":
            cfg = peft.AdaLoraConfig(init_r=budget.init_rank, target_r=budget.rank, lora_alpha=alpha,
                                     lora_dropout=args.adapter_dropout, target_modules=targets,
                                     total_step=TOTAL_STEPS, tinit=10, tfinal=100, deltaT=10,
                                     modules_to_save=head_names)
        else:
            cfg = peft.LoraConfig(r=args.rank, lora_alpha=alpha, lora_dropout=args.adapter_dropout,
                                  target_modules=targets, use_dora=config == "peft_dora",
                                  modules_to_save=head_names)
        pm = peft.get_peft_model(model, cfg)
        hooks = [PeftAdaLoraHook(pm)] if config == "peft_adalora" else []
        return pm, [(n, p) for n, p in pm.named_parameters() if p.requires_grad], hooks
    # a lorabench method
    head = freeze_backbone(model)
    mcfg = method_cfg(config)
    if "dropout" in mcfg:
        mcfg["dropout"] = args.adapter_dropout
    m = assemble.attach(model, spec, mcfg, budget)
    return model, list(m.named_trainable_parameters()) + head, m.hooks() + [_MethodKeeper(m)]


class _MethodKeeper(TrainerHook):
    """Keeps the method object alive next to its model (and its regularizer reachable)."""

    def __init__(self, method):
        self.method = method


class _OneBatch:
    def __init__(self):
        self.epoch = 0
        self.skip_batches = 0

    def __len__(self):
        return TOTAL_STEPS


def make_trainer(config: str, args) -> tuple[Trainer, dict]:
    model, params, hooks = build(config, args)
    reg = None
    for h in hooks:
        if isinstance(h, _MethodKeeper):
            reg = h.method.regularizer
    tcfg = TrainerConfig(epochs=1, max_steps=TOTAL_STEPS, batch_size=args.batch, precision=args.precision,
                         device=args.device, progress_bar=False, warmup_steps=0)
    tr = Trainer(tcfg, model, params, _OneBatch(), lambda m: {}, "accuracy", hooks=hooks, regularizer=reg)
    for h in hooks:
        h.on_train_begin(tr.state)
    model.train()
    return tr, make_batch(args.batch, args.seq, args.vocab)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(tr: Trainer, batch, n: int, device: str) -> list[float]:
    out = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        tr.train_step([batch])
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def clean_rounds(rounds: list[dict[str, list[float]]], disturbed: float) -> list[int]:
    """The rounds to use: all of them, or (`disturbed` > 0) those whose floor step took at most `disturbed` times
    the fastest floor step of the run. Another process taking CPU slows the configurations of a round unevenly
    (two torch threads sharing two cores with it), which no ratio corrects; such a round is repeated instead."""
    floor = [statistics.median(r["floor"]) for r in rounds]
    if not disturbed:
        return list(range(len(rounds)))
    return [k for k, f in enumerate(floor) if f <= disturbed * min(floor)]


def others_cpu(seconds: float = 2.0) -> float | None:
    """Cores' worth of CPU used by every process but this one over `seconds` (Linux /proc; None elsewhere)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(ticks) - ticks[3] - ticks[4], int(own[11]) + int(own[12])  # busy (not idle, iowait); ours

    try:
        (busy0, own0), t0 = sample(), time.perf_counter()
        time.sleep(seconds)
        (busy1, own1), t1 = sample(), time.perf_counter()
    except (OSError, ValueError, IndexError):
        return None
    return ((busy1 - busy0) - (own1 - own0)) / os.sysconf("SC_CLK_TCK") / (t1 - t0)


def wait_for_quiet(limit: float, threshold: float = 0.15) -> None:
    """Before a round: wait (at most `limit` seconds) until other processes use under `threshold` of a core."""
    if limit <= 0:
        return
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        busy = others_cpu()
        if busy is None or busy < threshold:
            return
        print(f"[wait] other processes use {busy:.1f} cores; waiting", file=sys.stderr)
        time.sleep(10)


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    """a[i] / b[i]: sample i of both configurations comes from the same round, so slow phases of the machine
    (this CPU's step times drift by ±20% over minutes) hit numerator and denominator alike."""
    return [x / y for x, y in zip(a, b)]


def iqr(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0])
    q = statistics.quantiles(values, n=4)
    return (q[0], q[2])


def configs(args) -> list[str]:
    names = ["floor", "head_only", "full_ft"] + methods.names() + ["peft_lora", "peft_dora", "peft_adalora"]
    if args.only:
        keep = set(args.only.split(","))
        names = [n for n in names if n in keep or n == "floor"]
    return names


def measure_memory(config: str, args) -> float:
    """Peak memory of a fresh process running only `config` for a few steps (on CUDA: of this process, with
    nothing else on the device, which counts the same and saves an interpreter start per configuration)."""
    if args.device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        tr, batch = make_trainer(config, args)
        time_steps(tr, batch, 3, args.device)
        peak = peak_memory_mb(torch.device(args.device))
        del tr, batch
        gc.collect()
        torch.cuda.empty_cache()
        return peak
    cmd = [sys.executable, __file__, "--memory-child", config, "--seq", str(args.seq)] + _passthrough(args)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK_MB "):
            return float(line.split()[1])
    raise RuntimeError(f"memory child for {config} failed:\n{out.stderr[-2000:]}")


def _passthrough(args) -> list[str]:
    return ["--model", args.model, "--batch", str(args.batch), "--rank", str(args.rank), "--precision",
            args.precision, "--device", args.device, "--adapter-dropout", str(args.adapter_dropout), "--vocab",
            str(args.vocab)] + (["--model-dropout", str(args.model_dropout)] if args.model_dropout is not None else [])


def memory_child(config: str, args) -> None:
    tr, batch = make_trainer(config, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    time_steps(tr, batch, 3, args.device)
    print(f"PEAK_MB {peak_memory_mb(torch.device(args.device if args.device != 'auto' else 'cpu')):.1f}")


def memory_rows(names: list[str], args) -> list[dict]:
    """Peak memory of each configuration (its own process on the CPU) and its ratio to PEFT's."""
    mem = {n: measure_memory(n, args) for n in names}
    rows = []
    for n in names:
        row = {"config": n, "seq": args.seq, "adapter_dropout": args.adapter_dropout, "peak_mb": mem[n]}
        if n in PEFT_OF and PEFT_OF[n] in mem:
            row["mem_to_peft"] = mem[n] / mem[PEFT_OF[n]]
        rows.append(row)
    return rows


def run_seq(args) -> list[dict]:
    names = configs(args)
    if getattr(args, "memory_only", False):  # (scaling.py passes its own namespace)
        return memory_rows(names, args)
    print(f"[seq {args.seq}, dropout {args.adapter_dropout}] building {len(names)} configurations: "
          f"{', '.join(names)}", file=sys.stderr)
    trainers = {n: make_trainer(n, args) for n in names}
    for n, (tr, b) in trainers.items():  # warm-up (allocator, autotuning, lazy optimizer state)
        time_steps(tr, b, args.warmup, args.device)
    rounds: list[dict[str, list[float]]] = []  # per round: each configuration's step times
    disturbed = getattr(args, "disturbed", 0.0)  # (scaling.py passes its own namespace)
    max_rounds = 3 * args.rounds if disturbed else args.rounds
    while True:
        wait_for_quiet(getattr(args, "quiet_wait", 0.0))
        rounds.append({n: time_steps(tr, b, args.steps, args.device) for n, (tr, b) in trainers.items()})
        kept = clean_rounds(rounds, disturbed)
        print(f"[seq {args.seq}] round {len(rounds)} ({len(kept)} kept): " +
              ", ".join(f"{n} {1000 * statistics.median(rounds[-1][n]):.0f}" for n in names), file=sys.stderr)
        if len(kept) >= args.rounds or len(rounds) >= max_rounds:
            break
    del trainers
    times = {n: [t for r in kept for t in rounds[r][n]] for n in names}
    rows = []
    for n in names:
        to_floor = paired_ratios(times[n], times["floor"])
        row = {"config": n, "seq": args.seq, "adapter_dropout": args.adapter_dropout,
               "median_ms": 1000 * statistics.median(times[n]),
               "to_floor": statistics.median(to_floor), "to_floor_iqr": iqr(to_floor), "samples": len(times[n]),
               "rounds_run": len(rounds), "rounds_kept": len(kept), "disturbed": disturbed,
               "times_ms": [[round(1000 * t, 1) for t in r[n]] for r in rounds]}  # every round, kept or not
        if n in PEFT_OF and PEFT_OF[n] in times:
            row["to_peft"] = statistics.median(paired_ratios(times[n], times[PEFT_OF[n]]))
        rows.append(row)
    if args.memory:
        for row, mem in zip(rows, memory_rows(names, args)):
            row.update(mem)
    return rows


def setup_of(args, seconds: float) -> dict:
    """What a table's numbers depend on besides the configuration (stored with the rows, shown in the header)."""
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return {"device": dev, "precision": args.precision, "model": args.model, "batch": args.batch, "rank": args.rank,
            "model_dropout": args.model_dropout, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
            "memory_only": getattr(args, "memory_only", False), "disturbed": getattr(args, "disturbed", 0.0),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "seconds": round(seconds)}


def render(parts: list[dict]) -> str:
    """The tables of one run, or of several parts (`--merge`) run with the same setup, each part's command listed."""
    first = parts[0]["setup"]
    differ = [k for k in ("device", "precision", "model", "batch", "rank", "model_dropout")
              if any(p["setup"].get(k) != first.get(k) for p in parts)]
    if differ:
        raise SystemExit(f"step_time: the parts differ in {', '.join(differ)}: not one table")
    dev = first["device"]
    commands = [f"`python bench/step_time.py {' '.join(p['argv'])}`" for p in parts]
    runs = "; ".join((f"median of {p['setup']['rounds']}x{p['setup']['steps']} interleaved steps after "
                      f"{p['setup']['warmup']} warm-up" if not p["setup"].get("memory_only") else "memory only")
                     + f", {p['setup']['seconds']} s" for p in parts)
    model_dropout = "default" if first["model_dropout"] is None else first["model_dropout"]
    lines = [f"# Step time per configuration ({dev}, {first['precision']})", "",
             ("Command: " if len(commands) == 1 else "Commands (one part each, merged with `--merge`): ")
             + ", ".join(commands), "",
             f"Model {first['model']}, batch {first['batch']}, rank {first['rank']} on all six maps of every block, "
             f"model dropout {model_dropout}; {runs}; torch {first['torch']}, {first['cpu']}, {first['cpus']} CPUs.",
             "",
             "`÷ floor`: step time over the frozen backbone's forward + activation-only backward, the median of "
             "the per-round ratios (each round times every configuration once), with their interquartile range; a "
             "round whose floor step took over `--disturbed` times the run's fastest (another process on the CPU) "
             "is repeated, at most up to 3x the rounds asked for (the .json keeps every round). "
             "`÷ PEFT`: the same over HF PEFT's implementation of the same method, at the same adapter dropout. "
             "`ms/step`: median. Memory: peak "
             f"{'RSS' if dev == 'cpu' else 'allocated CUDA memory'} of a process running only that configuration.",
             ""]
    rows = merge_rows(parts)
    for dropout in sorted({r.get("adapter_dropout", 0.0) for r in rows}):
        for seq in sorted({r["seq"] for r in rows}):
            table = [r for r in rows if r["seq"] == seq and r.get("adapter_dropout", 0.0) == dropout]
            if not table:
                continue
            timed = [r for r in table if "rounds_run" in r]
            dropped = timed[0]["rounds_run"] - timed[0]["rounds_kept"] if timed else 0
            lines += [f"## seq {seq}, adapter dropout {dropout:g}", ""]
            if dropped:
                lines += [f"{timed[0]['rounds_kept']} rounds kept of {timed[0]['rounds_run']}: {dropped} with the "
                          f"floor step over {timed[0].get('disturbed', 1.3)}x its fastest (another process on "
                          "the CPU) were repeated.", ""]
            lines += ["| config | ms/step | ÷ floor | ÷ floor IQR | ÷ PEFT | peak MB | mem ÷ PEFT |",
                      "|---|---|---|---|---|---|---|"]
            for r in table:
                f = lambda k, fmt: (fmt.format(r[k]) if k in r else "")  # noqa: E731
                iqr = f"{r['to_floor_iqr'][0]:.2f}–{r['to_floor_iqr'][1]:.2f}" if "to_floor_iqr" in r else ""
                lines.append(f"| {r['config']} | {f('median_ms', '{:.0f}')} | {f('to_floor', '{:.2f}')} | {iqr} | "
                             f"{f('to_peft', '{:.2f}')} | {f('peak_mb', '{:.0f}')} | {f('mem_to_peft', '{:.2f}')} |")
            lines.append("")
    return "\n".join(lines)


def merge_rows(parts: list[dict]) -> list[dict]:
    """The parts' rows, one per (configuration, seq, dropout): a timing-only part and a memory-only part of the
    same configuration (`--no-memory`, `--memory-only`) make one row; a later part's value wins."""
    merged: dict[tuple, dict] = {}
    for part in parts:
        for r in part["rows"]:
            key = (r["config"], r["seq"], r.get("adapter_dropout", 0.0))
            merged.setdefault(key, {}).update(r)
    return list(merged.values())


def write(text: str, data: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def add_config_arguments(p: argparse.ArgumentParser, seq_help: str | None = None, dropouts: bool = False) -> None:
    """The options `make_trainer` reads (shared with profile_step.py); `dropouts`: --adapter-dropout takes a
    comma-separated list (one table each) instead of one value."""
    p.add_argument("--model", default="minilm")
    p.add_argument("--seq", type=int, default=64, help=seq_help)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    if dropouts:
        p.add_argument("--adapter-dropout", default="0,0.1",
                       help="adapter dropout of every method and PEFT arm, comma-separated: one table each")
    else:
        p.add_argument("--adapter-dropout", type=float, default=0.0, help="adapter dropout of every method and PEFT arm")
    p.add_argument("--model-dropout", type=float, default=None, help="override the backbone's dropout")
    p.add_argument("--vocab", type=int, default=30522, help=argparse.SUPPRESS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, seq_help=argparse.SUPPRESS, dropouts=True)
    p.add_argument("--seqs", default="64,128", help="comma-separated sequence lengths")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=1, help="timed steps per configuration per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--disturbed", type=float, default=1.3,
                   help="repeat a round whose floor step took over this times the fastest one (0: keep every round)")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each round wait up to this many seconds for other processes to leave the CPU")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--memory-only", action="store_true", help="peak memory only, no timing (a part to --merge)")
    p.add_argument("--only", default=None, help="comma-separated configurations (floor is always kept)")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 round: a check of the script")
    p.add_argument("--out", default=None, help="results file (default bench/results/step_time_<device>.md)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="render the .json files of several runs (parts of one bench) as one table set")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    dropouts = [float(v) for v in str(args.adapter_dropout).split(",")]
    args.adapter_dropout = dropouts[0]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.memory_child:
        memory_child(args.memory_child, args)
        return 0
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"step_time_{dev}.md"
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        parts = [q for part in parts for q in part.get("parts", [part])]
        write(render(parts), {"parts": parts}, out)
        return 0
    if args.quick:
        args.model, args.seqs, args.rounds, args.batch, args.memory = "tiny", "16", 1, 4, False
        dropouts = dropouts[-1:]
    t0 = time.perf_counter()
    rows = []
    for dropout in dropouts:
        args.adapter_dropout = dropout
        for seq in [int(s) for s in args.seqs.split(",")]:
            args.seq = seq
            rows += run_seq(args)
    part = {"argv": raw, "setup": setup_of(args, time.perf_counter() - t0), "rows": rows}
    text = render([part])
    print(text)
    if not args.quick:
        write(text, part, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
