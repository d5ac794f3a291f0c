"""Trackers, read back from what they wrote: metrics.jsonl, a real offline W&B run, TensorBoard event files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import FIXTURE_GLUE, REPO
from lorabench import tracking

PATTERN = {"bert.encoder.layer.0.attention.self.query": 3, "bert.encoder.layer.0.output.dense": 1,
           "bert.encoder.layer.1.attention.self.query": 0, "bert.encoder.layer.1.output.dense": 4}


# --- reading an offline W&B run (wandb 0.31 ships no Python reader for its .wandb files) ----------------------

def wandb_records(run_dir: Path) -> list:
    """The protobuf records of `run-*.wandb`: a LevelDB-style log (7-byte file header ':W&B' + magic + version,
    then 32 KiB blocks of records, each with a 7-byte header crc32/length/type; types 1 full, 2-4 first/middle/
    last fragment; a block tail shorter than a header is zero padding)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def wandb_state(run_dir: Path) -> dict:
    """The run record, the final summary (updates applied in order) and the history rows."""
    run, summary, history = None, {}, []
    for rec in wandb_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
        elif kind == "summary":
            for u in rec.summary.update:
                key = "/".join(u.nested_key) if u.nested_key else u.key
                summary[key] = json.loads(u.value_json)
        elif kind == "history":
            history.append({"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json)
                            for i in rec.history.item})
    return {"run": run, "summary": summary, "history": history}


def offline_runs(out_dir: Path) -> list[Path]:
    """The offline run directories under a job directory, once their files are complete.

    `run.finish()` returns before wandb's service process has written the last records of the run to disk;
    shutting the service down (as process exit does) flushes them.
    """
    import wandb

    wandb.teardown()
    return sorted((out_dir / "wandb").glob("offline-run-*"))


# --- JSONL -----------------------------------------------------------------------------------------------------

def test_jsonl_one_line_per_eval_with_rank_totals(tmp_path):
    t = tracking.JsonlTracker(tmp_path)
    t.log_metrics({"train/loss": 0.5}, 2)
    t.log_eval({"step": 4, "epoch": 1, "eval/accuracy": 0.6})
    t.log_rank_pattern(PATTERN, 4)
    t.log_eval({"step": 8, "epoch": 2, "eval/accuracy": 0.7})  # its rank pattern never comes (a crash)
    t.finish("failed")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 4, "epoch": 1, "eval/accuracy": 0.6, "ranks/total": 8, "ranks/mean": 2.0,
                      "ranks/n_matrices": 4},
                     {"step": 8, "epoch": 2, "eval/accuracy": 0.7}]
    assert json.loads((tmp_path / "train_log.jsonl").read_text()) == {"step": 2, "train/loss": 0.5}


# --- W&B -------------------------------------------------------------------------------------------------------

def compose_config(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def test_wandb_offline_run_through_run_job(tmp_path, monkeypatch):
    """A real job with logger=wandb: group, job type, name, tags and config on the run; eval/* summaries hold
    the max and the last value of the run's evaluations; the rank table of every evaluation equals the rank
    pattern; train/ and eval/ scalars in the history."""
    from lorabench.run import run_job

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = compose_config(["model=tiny", "task=mrpc", "logger=wandb", f"data.glue_dir={FIXTURE_GLUE}",
                             "trainer.epochs=3", "trainer.batch_size=1", "trainer.log_every=1",
                             "trainer.progress_bar=false", "trainer.lr=0.05"])
    config["group"] = "sweep-2026"
    config["run_name"] = "model=tiny,task=mrpc"
    out = tmp_path / "job"
    results = run_job(config, out)

    (run_dir,) = offline_runs(out)
    state = wandb_state(run_dir)
    run = state["run"]
    assert run.run_group == "sweep-2026" and run.job_type == "mrpc" and run.display_name == "model=tiny,task=mrpc"
    assert list(run.tags) == ["lora", "mrpc", "tiny", "r8"]
    logged_cfg = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert logged_cfg["task"]["name"] == "mrpc" and logged_cfg["trainer"]["lr"] == 0.05

    history = results["history"]
    assert len(history) == 3
    for metric in ("eval/accuracy", "eval/f1"):
        values = [h[metric] for h in history]
        assert state["summary"][metric] == {"max": pytest.approx(max(values)), "last": pytest.approx(values[-1])}
    assert state["summary"]["best/accuracy"] == pytest.approx(results["best"]["eval/accuracy"])
    assert state["summary"]["status"] == "ok"
    assert any("train/loss" in row for row in state["history"])
    assert sum("ranks/hist/_type" in row for row in state["history"]) == 3

    tables = sorted((run_dir / "files" / "media" / "table" / "ranks").glob("table_*.table.json"))
    assert len(tables) == 3
    last_table = json.loads(max(tables, key=lambda p: int(p.name.split("_")[1])).read_text())
    assert last_table["columns"] == ["module", "rank"]
    assert {m: r for m, r in last_table["data"]} == results["rank_pattern"]


def test_wandb_reinit_in_one_process(tmp_path, monkeypatch):
    """A sweep runs its jobs in one process: a job whose run was left open must not absorb the next job's data."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    meta = {"task": "rte", "tags": ["lora", "rte", "tiny", "r8"]}
    first = tracking.build_tracker({"backend": "wandb", "project": "p"}, tmp_path / "a", {"seed": 1},
                                   {**meta, "name": "first", "group": "g1"})
    first.log_eval({"step": 1, "epoch": 1, "eval/accuracy": 0.25})
    # no finish(): the previous job died without cleaning up
    second = tracking.build_tracker({"backend": "wandb", "project": "p"}, tmp_path / "b", {"seed": 2},
                                    {**meta, "name": "second", "group": "g2"})
    for step, acc in ((1, 0.5), (2, 0.9), (3, 0.75)):
        second.log_eval({"step": step, "epoch": step, "eval/accuracy": acc})
        second.log_rank_pattern(PATTERN, step)
    second.finish("ok")
    first.finish("failed")  # harmless on an already finished run

    (a,) = offline_runs(tmp_path / "a")
    (b,) = offline_runs(tmp_path / "b")
    sa, sb = wandb_state(a), wandb_state(b)
    assert sa["run"].run_group == "g1" and sb["run"].run_group == "g2"
    assert sa["run"].run_id != sb["run"].run_id
    assert sa["summary"]["eval/accuracy"] == {"max": 0.25, "last": 0.25}
    assert sb["summary"]["eval/accuracy"] == {"max": 0.9, "last": 0.75}
    assert sb["summary"]["ranks/total"] == 8


# --- TensorBoard ---------------------------------------------------------------------------------------------

def test_tensorboard_scalars_histograms_text_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = {"seed": 1, "method": {"name": "lora", "alpha": 16}, "budget": {"target_modules": ["query"]},
              "run_name": None}
    t = tracking.build_tracker({"backend": "tensorboard"}, tmp_path, config, {"task": "rte", "name": "x", "tags": []})
    t.log_metrics({"train/loss": 0.7, "train/lr": 1e-3}, 2)
    for step, acc in ((4, 0.6), (8, 0.55)):
        t.log_eval({"step": step, "epoch": step // 4, "eval/accuracy": acc})
        t.log_rank_pattern(PATTERN, step)
    t.log_summary({"best/accuracy": 0.6})
    t.finish("ok")

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "eval/accuracy", "ranks/total", "ranks/mean", "hparam/best/accuracy",
            "hparam/last/accuracy"} <= set(tags["scalars"])
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("eval/accuracy")] == [(4, 0.6), (8, 0.55)]
    assert [e.value for e in acc.Scalars("ranks/total")] == [8, 8]
    hist = acc.Histograms("ranks/hist")
    assert [h.step for h in hist] == [4, 8] and hist[0].histogram_value.num == 4
    assert hist[0].histogram_value.sum == 8 and hist[0].histogram_value.max == 4
    assert "ranks/table/text_summary" in tags["tensors"]
    text = acc.Tensors("ranks/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| bert.encoder.layer.0.output.dense | 1 |" in text
    hparams = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["method.alpha"].number_value == 16
    assert start.session_start_info.hparams["budget.target_modules"].string_value == "['query']"
