"""GLUE reading: real quirks on fixture TSVs, every malformed-input error, the real files, the tokenizer cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lorabench.data import (BatchLoader, Collator, load_split_examples, load_task_spec, read_glue_tsv,
                            sample_indices, task_names, tokenize)
from lorabench.errors import DataError


def test_nine_tasks_have_specs():
    assert task_names() == sorted(["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"])
    mnli = load_task_spec("mnli")
    assert [s.suffix for s in mnli.eval_splits] == ["", "_mm"]
    assert load_task_spec("stsb").num_labels == 1 and load_task_spec("mnli").num_labels == 3


def test_quotes_and_null_are_literal_text(fixture_glue_dir):
    ex = read_glue_tsv(fixture_glue_dir / "RTE" / "train.tsv", load_task_spec("rte"))
    assert ex.text_a[0] == 'He said "hi'  # an unbalanced quote does not swallow the rest of the file
    assert ex.text_b[0] == 'A "quoted" premise.'
    assert ex.text_a[1] == "null" and ex.text_b[1] == "NA"  # not None / NaN
    assert ex.labels == [0, 1, 0, 1]
    assert len(ex) == 4


def test_cola_has_no_header_and_no_final_newline(fixture_glue_dir):
    spec = load_task_spec("cola")
    train = read_glue_tsv(fixture_glue_dir / "CoLA" / "train.tsv", spec)
    assert train.text_a[0].startswith("Our friends won't buy")
    assert train.labels == [1, 0, 1] and train.text_b is None
    assert train.text_a[2] == "null"
    dev = read_glue_tsv(fixture_glue_dir / "CoLA" / "dev.tsv", spec)  # no newline after the last row
    assert dev.text_a == ["They drank the pub dry.", "They drank the pub."]


def test_mrpc_bom_is_stripped(fixture_glue_dir):
    ex = read_glue_tsv(fixture_glue_dir / "MRPC" / "train.tsv", load_task_spec("mrpc"))
    assert ex.labels == [1, 0]
    assert ex.text_a[0] == 'He said the pie "business" fits .'


def test_stsb_is_regression(fixture_glue_dir):
    ex = read_glue_tsv(fixture_glue_dir / "STS-B" / "train.tsv", load_task_spec("stsb"))
    assert ex.labels == [5.0, 1.25]


def _write(tmp_path: Path, task_dir: str, name: str, content: str) -> Path:
    d = tmp_path / task_dir
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(content)
    return p


@pytest.mark.parametrize("content, fragment", [
    ("", "is empty"),
    ("idx\ts1\ts2\tlabel\n0\ta\tb\tentailment\n", "wrong header"),
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tnot_entailment\n", "line 3: expected 4"),
    ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", "line 3: label 'maybe'"),
    ("index\tsentence1\tsentence2\tlabel\n", "no examples"),
])
def test_malformed_files_name_file_and_line(tmp_path, content, fragment):
    p = _write(tmp_path, "RTE", "train.tsv", content)
    with pytest.raises(DataError, match=fragment) as e:
        read_glue_tsv(p, load_task_spec("rte"))
    assert str(p) in str(e.value)


def test_regression_label_must_be_a_number(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    p = _write(tmp_path, "STS-B", "train.tsv", header + "0\tg\tf\ty\to\ts\ts\ta\tb\tfive\n")
    with pytest.raises(DataError, match="line 2: label 'five' is not a number"):
        read_glue_tsv(p, load_task_spec("stsb"))


def test_missing_dir_folder_and_file_messages(tmp_path, fixture_glue_dir):
    rte = load_task_spec("rte")
    with pytest.raises(DataError, match="GLUE directory .* does not exist.*GLUE_DIR"):
        load_split_examples(rte, "train", tmp_path / "nope")
    with pytest.raises(DataError, match=r"folder .*QNLI not found"):
        load_split_examples(load_task_spec("qnli"), "train", fixture_glue_dir)
    d = tmp_path / "glue"
    shutil.copytree(fixture_glue_dir / "RTE", d / "RTE")
    (d / "RTE" / "dev.tsv").unlink()
    with pytest.raises(DataError, match=r"dev.tsv not found \(looked in"):
        load_split_examples(rte, "validation", d)


def test_real_glue_files_read_completely(real_glue_dir):
    """Row counts of the real files equal MANIFEST.tsv (every quirk handled on the real data)."""
    manifest = {}
    for line in (real_glue_dir / "MANIFEST.tsv").read_text().splitlines()[1:]:
        f = line.split("\t")
        manifest[(f[0], f[1])] = int(f[2])
    for task in ("cola", "sst2", "mrpc", "stsb", "rte", "wnli"):
        spec = load_task_spec(task)
        assert len(load_split_examples(spec, "train", real_glue_dir)) == manifest[(spec.dir, "train.tsv")]
        assert len(load_split_examples(spec, "validation", real_glue_dir)) == manifest[(spec.dir, "dev.tsv")]
    qnli = load_task_spec("qnli")
    assert len(load_split_examples(qnli, "validation", real_glue_dir)) == manifest[("QNLI", "dev.tsv")]


def test_tokenize_cache_roundtrip(tmp_path, fixture_glue_dir, minilm_tokenizer):
    spec = load_task_spec("rte")
    ex = read_glue_tsv(fixture_glue_dir / "RTE" / "train.tsv", spec)
    a = tokenize(ex, minilm_tokenizer, 32, False, cache_dir=tmp_path)
    files = list(tmp_path.glob("tok-*.pt"))
    assert len(files) == 1
    b = tokenize(ex, minilm_tokenizer, 32, False, cache_dir=tmp_path)
    assert a.input_ids == b.input_ids and a.token_type_ids == b.token_type_ids and a.labels == b.labels
    c = tokenize(ex, minilm_tokenizer, 8, False, cache_dir=tmp_path)  # another max length: another entry
    assert len(list(tmp_path.glob("tok-*.pt"))) == 2 and max(len(s) for s in c.input_ids) == 8


def test_collator_pads_to_batch_max_and_loader_is_deterministic(fixture_glue_dir, minilm_tokenizer):
    spec = load_task_spec("rte")
    tok = tokenize(read_glue_tsv(fixture_glue_dir / "RTE" / "train.tsv", spec), minilm_tokenizer, 64, False)
    collate = Collator(minilm_tokenizer.pad_token_id)
    batch = collate(tok, [0, 2])
    longest = max(len(tok.input_ids[0]), len(tok.input_ids[2]))
    assert batch["input_ids"].shape == (2, longest)
    assert batch["attention_mask"].sum().item() == len(tok.input_ids[0]) + len(tok.input_ids[2])
    assert batch["labels"].dtype == torch.long
    loader = BatchLoader(tok, 3, collate, seed=5)
    first = [b["input_ids"].tolist() for b in loader]
    again = [b["input_ids"].tolist() for b in loader]
    assert first == again and len(first) == 2
    loader.epoch = 1
    assert loader.order(0) != loader.order(1) or len(tok) < 3
    loader.skip_batches = 1
    assert [b["input_ids"].tolist() for b in loader] == [b["input_ids"].tolist() for b in
                                                          BatchLoader(tok, 3, collate, seed=5, epoch=1)][1:]


def test_sample_indices_fixed_subset():
    assert sample_indices(10, None) == list(range(10))
    s = sample_indices(1000, 50)
    assert s == sample_indices(1000, 50) and len(set(s)) == 50 and s == sorted(s)


def test_suite_caches_stay_out_of_home(tmp_path, real_glue_dir):
    """conftest points LORABENCH_CACHE (and the other caches) at a session temporary directory: a run made by the
    suite, here with HOME set to an empty folder, leaves HOME empty and tokenizes into that directory."""
    from conftest import TEST_CACHE_ROOT, run_train

    cache = Path(os.environ["LORABENCH_CACHE"])
    assert cache.is_relative_to(TEST_CACHE_ROOT)
    home = tmp_path / "home"
    home.mkdir()
    run_dir = tmp_path / "run"
    p = run_train(["task=rte", "model=tiny", "trainer=debug", "logger=none", "trainer.max_train_samples=32",
                   "trainer.max_eval_samples=16", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"],
                  cwd=tmp_path, env={"HOME": str(home), "GLUE_DIR": str(real_glue_dir), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (home / ".cache" / "lorabench").exists()
    assert sorted(str(f.relative_to(home)) for f in home.rglob("*")) == []  # nothing else either
    assert json.loads((run_dir / "results.json").read_text())["config"]["data"]["cache_dir"] == str(cache)
    assert list(cache.glob("tok-*.pt"))
