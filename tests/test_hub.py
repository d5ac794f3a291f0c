"""GLUE from the Hugging Face hub without GLUE_DIR: when the hub cannot work (switched off, or no network) the run
ends at once with one `error:` line instead of `datasets` retrying for half a minute; the probe itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import types

import pytest

from lorabench import data
from lorabench.data import load_split_examples, load_task_spec
from lorabench.errors import DataError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
              "no_proxy")


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in `datasets` module that records its calls (a real call would try the network)."""
    calls: list[tuple] = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0, 1]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def _fill_cache(cache, path="nyu-mll/glue", name="rte"):
    # the layout `datasets` leaves: <cache>/nyu-mll___glue/rte/<version>/<hash>/
    (cache / path.replace("/", "___") / name / "0.0.0" / "abc123").mkdir(parents=True)


def test_no_network_fails_at_once_without_calling_datasets(monkeypatch, fake_datasets, empty_cache):
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    probes = []
    monkeypatch.setattr(data, "hub_reachable", lambda: probes.append(1) or False)
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        load_split_examples(load_task_spec("rte"), "train", None)
    assert time.monotonic() - t0 < 1.0
    message = str(e.value)
    assert "unreachable" in message and "GLUE_DIR" in message and "data.glue_dir" in message
    assert "HF_HUB_OFFLINE=1" not in message  # nothing cached: no point suggesting the cache
    assert fake_datasets == [] and probes == [1]
    # with a copy in the datasets cache the message says how to use it
    _fill_cache(empty_cache)
    with pytest.raises(DataError, match=r"set HF_HUB_OFFLINE=1 to read the copy of nyu-mll/glue/rte"):
        load_split_examples(load_task_spec("rte"), "train", None)
    assert fake_datasets == []


@pytest.mark.parametrize("var", OFFLINE_VARS)
def test_offline_variable_skips_the_hub_and_the_probe(monkeypatch, fake_datasets, empty_cache, var):
    for v in OFFLINE_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "1")
    monkeypatch.setattr(data, "hub_reachable", lambda: pytest.fail("probed although offline"))
    with pytest.raises(DataError, match=rf"switched off \({var}=1\).*GLUE_DIR.*or unset {var}"):
        load_split_examples(load_task_spec("rte"), "validation", None)
    assert fake_datasets == []
    # offline with a filled datasets cache: datasets reads its copy (no network call in offline mode)
    _fill_cache(empty_cache)
    ex = load_split_examples(load_task_spec("rte"), "validation", None)
    assert fake_datasets == [("nyu-mll/glue", "rte", "validation")] and ex.labels == [0, 1]


def test_offline_variable_set_to_false_is_online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert data.hub_offline_variable() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # datasets lets HF_DATASETS_OFFLINE decide when it is set
    assert data.hub_offline_variable() is None
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    assert data.hub_offline_variable() == "HF_HUB_OFFLINE=1"


def test_probe_connects_once_per_process(monkeypatch):
    """The real probe against a local listening socket (reachable) and a closed port (not), cached per address."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data, "_hub_probes", {})
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert data.hub_address() == ("127.0.0.1", port)
        assert data.hub_reachable(timeout=2)
    assert data.hub_reachable(timeout=2)  # cached: the port is closed by now
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, not listening: connections are refused
        monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{closed}")
        t0 = time.monotonic()
        assert not data.hub_reachable(timeout=2)
        assert time.monotonic() - t0 < 2.5
    assert data._hub_probes == {("127.0.0.1", port): True, ("127.0.0.1", closed): False}


def test_probe_goes_to_the_https_proxy(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "proxy.example:3128")
    assert data.hub_address() == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert data.hub_address() == ("huggingface.co", 443)


def test_train_offline_without_glue_dir_is_one_error_line(tmp_path):
    """`python -m train` with HF_HUB_OFFLINE=1 and no GLUE data: exit 2 within seconds, one line, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    for var in ("GLUE_DIR", "HF_DATASETS_OFFLINE"):
        env.pop(var, None)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "train", "task=rte", "model=tiny", "logger=none", "trainer=debug",
                        "data.glue_dir=null", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert p.returncode == 2, p.stderr[-3000:]
    assert elapsed < 20, f"took {elapsed:.1f} s"
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == p.stderr.strip().splitlines()[-1], p.stderr[-3000:]
    assert "HF_HUB_OFFLINE=1" in errors[0] and "GLUE_DIR" in errors[0]
    assert "Traceback" not in p.stderr and "Retrying" not in p.stderr + p.stdout


def test_hub_warnings_print_once_under_a_root_handler(monkeypatch):
    """huggingface_hub and datasets add a stderr handler to their loggers and propagate too: under Hydra (a root
    handler) a warning printed twice. Their own handler goes when a root handler is there; a FileHandler stays."""
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [logging.NullHandler()])
    hub = logging.getLogger("huggingface_hub")
    own, kept = logging.StreamHandler(), logging.FileHandler(os.devnull, delay=True)
    monkeypatch.setattr(hub, "handlers", [own, kept])
    data._hub_logs_once()
    assert hub.handlers == [kept]
    monkeypatch.setattr(root, "handlers", [])  # no root handler (no Hydra): the library's own one stays
    monkeypatch.setattr(hub, "handlers", [own])
    data._hub_logs_once()
    assert hub.handlers == [own]
