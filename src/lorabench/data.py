"""GLUE data: task specs, strict TSV reading, hub fallback, cached tokenization, batching.

The task table lives in conf/task/*.yaml (configs are data); `TaskSpec` is its typed form. TSVs are read
exactly as the GLUE README says: tab-separated, no quote handling (quotes are literal text), no NA parsing
(the sentence "null" stays a string), an optional UTF-8 BOM (MRPC), CoLA without a header.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .errors import ConfigError, DataError
from .validate import CONF_DIR

TASK_CONF_DIR = CONF_DIR / "task"


@dataclass(frozen=True)
class EvalSplit:
    name: str  # e.g. "validation", "validation_mismatched"
    file: str  # file name inside the task folder
    hub_split: str
    suffix: str  # appended to metric names ("_mm" for MNLI mismatched)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dir: str
    header: bool
    text_columns: tuple  # header names, or column indices when header is false
    label_column: Any
    label_values: tuple[str, ...] | None  # file values in label-id order; None for regression
    is_regression: bool
    train_file: str
    eval_splits: tuple[EvalSplit, ...]
    hub: dict[str, Any]
    metrics: tuple[str, ...]
    primary_metric: str
    n_columns: int | None = None  # expected field count for files without a header
    title: str = ""  # how reports name the task (default: its name)
    table_metrics: tuple[str, ...] = ()  # the report's columns, the first in the GLUE average (default: primary)

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_values or ())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        splits = tuple(EvalSplit(name=k, file=v["file"], hub_split=v.get("hub_split", k), suffix=v.get("suffix", ""))
                       for k, v in d["eval_splits"].items())
        lv = d.get("label_values")
        return cls(name=d["name"], dir=d["dir"], header=bool(d["header"]), text_columns=tuple(d["text_columns"]),
                   label_column=d["label_column"], label_values=tuple(str(v) for v in lv) if lv else None,
                   is_regression=bool(d["is_regression"]), train_file=d.get("train_file", "train.tsv"),
                   eval_splits=splits, hub=dict(d.get("hub") or {}), metrics=tuple(d["metrics"]),
                   primary_metric=d["primary_metric"], n_columns=d.get("n_columns"),
                   title=d.get("title") or d["name"],
                   table_metrics=tuple(d.get("table_metrics") or (d["primary_metric"],)))

    def __post_init__(self) -> None:
        unknown = [m for m in self.table_metrics if m not in self.metrics]
        if unknown:
            raise ConfigError(f"task {self.name}: table_metrics {unknown} are not among its metrics "
                              f"{list(self.metrics)}")


def task_names() -> list[str]:
    return sorted(p.stem for p in TASK_CONF_DIR.glob("*.yaml"))


def load_task_spec(name: str) -> TaskSpec:
    """The spec of a GLUE task from conf/task/<name>.yaml (for code that runs without Hydra)."""
    import yaml  # PyYAML comes with omegaconf

    path = TASK_CONF_DIR / f"{name}.yaml"
    if not path.exists():
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return TaskSpec.from_dict(yaml.safe_load(path.read_text()))


@dataclass
class Examples:
    """One split as parallel lists: first text, optional second text, label (int id or float)."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[Any]
    source: str  # where it came from (file path or hub id), for messages

    def __len__(self) -> int:
        return len(self.labels)


# --- reading --------------------------------------------------------------------------------------------------

def read_glue_tsv(path: Path, spec: TaskSpec) -> Examples:
    """Read one GLUE TSV strictly; every problem names the file and the 1-based line."""
    if not path.exists():
        raise DataError(f"missing GLUE file {path}")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"GLUE file {path} is empty")
    try:
        text = raw.decode("utf-8-sig")  # strips MRPC's byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(f"GLUE file {path} is not UTF-8 text ({e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # newline after the last row (CoLA/dev.tsv has none)
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]

    first_data_line = 0
    if spec.header:
        header = lines[0].split("\t")
        wanted = [*spec.text_columns, spec.label_column]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"{path} line 1: wrong header for task {spec.name}: expected columns "
                            f"{wanted}, missing {missing}; the header is {header}")
        n_fields = len(header)
        text_idx = [header.index(c) for c in spec.text_columns]
        label_idx = header.index(spec.label_column)
        first_data_line = 1
    else:
        n_fields = spec.n_columns
        text_idx = [int(c) for c in spec.text_columns]
        label_idx = int(spec.label_column)

    label_to_id = {v: i for i, v in enumerate(spec.label_values)} if spec.label_values else None
    text_a, text_b, labels = [], ([] if len(text_idx) > 1 else None), []
    for lineno, line in enumerate(lines[first_data_line:], start=first_data_line + 1):
        fields = line.split("\t")
        if n_fields is not None and len(fields) != n_fields:
            raise DataError(f"{path} line {lineno}: expected {n_fields} tab-separated columns, found {len(fields)}")
        raw_label = fields[label_idx]
        if spec.is_regression:
            try:
                label: Any = float(raw_label)
            except ValueError:
                raise DataError(f"{path} line {lineno}: label {raw_label!r} is not a number "
                                f"(task {spec.name} is regression)") from None
        else:
            if raw_label not in label_to_id:
                raise DataError(f"{path} line {lineno}: label {raw_label!r} is not one of "
                                f"{list(spec.label_values)} for task {spec.name}")
            label = label_to_id[raw_label]
        text_a.append(fields[text_idx[0]])
        if text_b is not None:
            text_b.append(fields[text_idx[1]])
        labels.append(label)
    if not labels:
        raise DataError(f"GLUE file {path} has a header but no examples")
    return Examples(text_a, text_b, labels, source=str(path))


def resolve_glue_dir(glue_dir: str | os.PathLike | None) -> Path | None:
    """The configured GLUE directory, else $GLUE_DIR, else None (use the hub)."""
    value = glue_dir if glue_dir not in (None, "") else os.environ.get("GLUE_DIR") or None
    return Path(value).expanduser() if value else None


def task_dir(glue_dir: Path, spec: TaskSpec) -> Path:
    if not glue_dir.is_dir():
        raise DataError(f"GLUE directory {glue_dir} does not exist. Point data.glue_dir (or the GLUE_DIR "
                        f"environment variable) at a glue_data/-style folder, or leave both unset to use the "
                        f"Hugging Face hub (nyu-mll/glue).")
    d = glue_dir / spec.dir
    if not d.is_dir():
        raise DataError(f"task {spec.name}: folder {d} not found in GLUE directory {glue_dir}. Put the GLUE "
                        f"{spec.dir} files (train.tsv, dev.tsv) there, or unset GLUE_DIR to use the hub.")
    return d


def load_split_examples(spec: TaskSpec, split: str, glue_dir: Path | None) -> Examples:
    """`split` is "train" or the name of one of the task's eval splits."""
    if glue_dir is not None:
        d = task_dir(glue_dir, spec)
        fname = spec.train_file if split == "train" else _eval_split(spec, split).file
        path = d / fname
        if not path.exists():
            raise DataError(f"task {spec.name}: {path} not found (looked in {d}). This GLUE copy lacks the "
                            f"{split} split of {spec.dir}; add the file or use the hub (unset GLUE_DIR).")
        return read_glue_tsv(path, spec)
    return _load_hub(spec, split)


def _eval_split(spec: TaskSpec, name: str) -> EvalSplit:
    for s in spec.eval_splits:
        if s.name == name:
            return s
    raise DataError(f"task {spec.name} has no eval split {name!r}")


# --- the Hugging Face hub --------------------------------------------------------------------------------------
#
# Without GLUE_DIR the data comes from the hub through `datasets`, which retries a dead network for ~30 s before
# giving up. So the hub is tried only when it can work: not when the user switched it off (HF_HUB_OFFLINE /
# HF_DATASETS_OFFLINE; a copy in the datasets cache is still read then, as `datasets` does offline), and not when
# a short connection probe finds no route to it (done once per process).

HUB_PROBE_TIMEOUT = 3.0  # seconds for the whole probe, name lookup included
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub and datasets accept as "set"
_hub_probes: dict[tuple[str, int], bool] = {}  # (host, port) → reachable, once per process


def hub_offline_variable() -> str | None:
    """The environment variable that switches the hub off for `datasets`, as "NAME=value"; None when online.

    `datasets` lets HF_DATASETS_OFFLINE, when set at all, decide over HF_HUB_OFFLINE; so do we."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        value = os.environ.get(var)
        if value is not None:
            return f"{var}={value}" if value.strip().upper() in _TRUE_VALUES else None
    return None


def hub_address() -> tuple[str, int]:
    """(host, port) that a hub download connects to first: the HTTPS proxy when one applies, else HF_ENDPOINT."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    target = endpoint
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    default_port = 443 if target.scheme == "https" else 80
    return target.hostname or "huggingface.co", target.port or default_port


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the hub (or its proxy) opens within `timeout` seconds; probed once per process."""
    address = hub_address()
    if address not in _hub_probes:
        _hub_probes[address] = _can_connect(address, timeout)
    return _hub_probes[address]


def _can_connect(address: tuple[str, int], timeout: float) -> bool:
    # In a thread: a socket timeout does not bound the name lookup, which can hang far longer on a dead network.
    opened: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    worker = threading.Thread(target=attempt, name="lorabench-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(opened and opened[0])


def datasets_cache_dir() -> Path:
    """Where `datasets` keeps what it downloaded (its own rule, computed without importing it)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache",
                                                        "huggingface")
    return Path(hf_home).expanduser() / "datasets"


def _cached_on_disk(path: str, name: str) -> bool:
    # datasets keeps nyu-mll/glue's rte under <cache>/nyu-mll___glue/rte/<version>/<hash>/
    d = datasets_cache_dir() / path.replace("/", "___") / name
    return d.is_dir() and any(p.is_dir() for p in d.glob("*/*"))


def _check_hub_usable(spec: TaskSpec, path: str, name: str) -> None:
    """Raise the one-line DataError when loading from the hub cannot work, before `datasets` spends its retries."""
    no_data = f"task {spec.name}: no GLUE data: data.glue_dir and GLUE_DIR are unset"
    fix = "Set GLUE_DIR (or data.glue_dir=<dir>) to a glue_data/ folder"
    cache = datasets_cache_dir()
    offline = hub_offline_variable()
    if offline is not None:
        if _cached_on_disk(path, name):
            return  # datasets reads its cached copy without any network call
        var = offline.split("=", 1)[0]
        raise DataError(f"{no_data}, and the Hugging Face hub is switched off ({offline}) with no copy of "
                        f"{path}/{name} in the datasets cache ({cache}). {fix}, or unset {var} to download it.")
    if not hub_reachable():
        host, port = hub_address()
        cached = (f", or set HF_HUB_OFFLINE=1 to read the copy of {path}/{name} in the datasets cache ({cache})"
                  if _cached_on_disk(path, name) else "")
        raise DataError(f"{no_data}, and the Hugging Face hub is unreachable (no connection to {host}:{port} within "
                        f"{HUB_PROBE_TIMEOUT:g} s; offline?). {fix}{cached}.")


def _hub_logs_once() -> None:
    """huggingface_hub and datasets give their loggers a stderr handler of their own and let records propagate as
    well: under Hydra, whose handlers sit on the root logger, every hub warning printed twice. With a root handler
    in place, theirs goes (the records still reach the console and the job's log file, once)."""
    if not logging.getLogger().handlers:
        return
    for name in ("huggingface_hub", "datasets"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # their default; a FileHandler someone added stays
                logger.removeHandler(handler)


def _load_hub(spec: TaskSpec, split: str) -> Examples:
    hub_split = "train" if split == "train" else _eval_split(spec, split).hub_split
    path, name = spec.hub.get("path", "nyu-mll/glue"), spec.hub.get("name", spec.name)
    _check_hub_usable(spec, path, name)
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"the `datasets` package is needed to read GLUE from the hub: {e}") from None
    _hub_logs_once()
    try:
        ds = datasets.load_dataset(path, name, split=hub_split)
    except Exception as e:
        raise DataError(f"could not load {path}/{name} split {hub_split} from the Hugging Face hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). Offline? Set GLUE_DIR to a local "
                        f"glue_data/ folder.") from None
    cols = spec.hub["text_columns"]
    labels = [float(v) for v in ds["label"]] if spec.is_regression else [int(v) for v in ds["label"]]
    return Examples(list(ds[cols[0]]), list(ds[cols[1]]) if len(cols) > 1 else None, labels,
                    source=f"hub:{path}/{name}:{hub_split}")


# --- tokenization with an on-disk cache -------------------------------------------------------------------------

@dataclass
class TokenizedSplit:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[Any]
    is_regression: bool

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "TokenizedSplit":
        return TokenizedSplit([self.input_ids[i] for i in indices],
                              [self.token_type_ids[i] for i in indices] if self.token_type_ids else None,
                              [self.labels[i] for i in indices], self.is_regression)


def _fingerprint(examples: Examples, tokenizer, max_length: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([tokenizer.name_or_path, type(tokenizer).__name__, len(tokenizer), max_length]).encode())
    for a, b, y in zip(examples.text_a, examples.text_b or [None] * len(examples), examples.labels):
        h.update(f"{a}\t{b}\t{y}\n".encode())
    return h.hexdigest()[:24]


def tokenize(examples: Examples, tokenizer, max_length: int, is_regression: bool,
             cache_dir: Path | None = None) -> TokenizedSplit:
    """Tokenize without padding (the collator pads per batch); reuse an identical earlier result on disk."""
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"tok-{_fingerprint(examples, tokenizer, max_length)}.pt"
        if cache_file.exists():
            try:
                d = torch.load(cache_file, weights_only=True)
                return TokenizedSplit(d["input_ids"], d["token_type_ids"], d["labels"], is_regression)
            except Exception:
                pass  # a corrupt cache entry is rebuilt below
    enc = tokenizer(examples.text_a, examples.text_b, truncation=True, max_length=max_length)
    tt = enc.get("token_type_ids")
    split = TokenizedSplit(list(enc["input_ids"]), list(tt) if tt is not None else None, list(examples.labels),
                           is_regression)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save({"input_ids": split.input_ids, "token_type_ids": split.token_type_ids, "labels": split.labels},
                   tmp)
        os.replace(tmp, cache_file)  # atomic: a concurrent reader never sees half a file
    return split


def sample_indices(n: int, max_samples: int | None, seed: int = 0) -> list[int]:
    """A fixed random subset (the same for every method and run seed), in file order."""
    if not max_samples or max_samples >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:max_samples].tolist())


# --- batching ------------------------------------------------------------------------------------------------------

@dataclass
class Collator:
    pad_token_id: int

    def __call__(self, split: TokenizedSplit, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        seqs = [split.input_ids[i] for i in indices]
        length = max(len(s) for s in seqs)  # dynamic padding: each batch to its longest sequence
        ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if split.token_type_ids is not None:
            tt = torch.zeros((len(seqs), length), dtype=torch.long)
            for row, i in enumerate(indices):
                t = split.token_type_ids[i]
                tt[row, : len(t)] = torch.tensor(t, dtype=torch.long)
            batch["token_type_ids"] = tt
        labels = [split.labels[i] for i in indices]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if split.is_regression else torch.long)
        return batch


@dataclass
class BatchLoader:
    """Deterministic batches: epoch e of a run with seed s always has the same order.

    The order is a pure function of (seed, epoch), so a resumed run can skip the batches it already saw.
    `group_by_length` sorts within chunks of 50 batches to cut padding without losing randomness.
    """

    split: TokenizedSplit
    batch_size: int
    collate: Collator
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False
    group_by_length: bool = False
    epoch: int = 0
    skip_batches: int = field(default=0)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        n = len(self.split)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        idx = torch.randperm(n, generator=g).tolist()
        if self.group_by_length:
            chunk = self.batch_size * 50
            lengths = [len(s) for s in self.split.input_ids]
            idx = [i for c in range(0, n, chunk) for i in sorted(idx[c:c + chunk], key=lambda j: -lengths[j])]
            batches = [idx[b:b + self.batch_size] for b in range(0, n, self.batch_size)]
            perm = torch.randperm(len(batches), generator=g).tolist()
            idx = [i for p in perm for i in batches[p]]
        return idx

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        idx = self.order(self.epoch)
        for b in range(self.skip_batches, len(self)):
            chunk = idx[b * self.batch_size:(b + 1) * self.batch_size]
            if not chunk:
                break
            yield self.collate(self.split, chunk)


@dataclass(frozen=True)
class DataLimits:
    """The trainer-group keys that shape the data rather than the loop."""

    max_train_samples: int | None = None  # a fixed random subset (the same for every method and seed)
    max_eval_samples: int | None = None
    max_seq_length: int = 128
    group_by_length: bool = False

    def __post_init__(self) -> None:
        from .validate import check_field_types

        check_field_types(self, "trainer")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"trainer.{key} must be >= 1, or null for the whole split; got {value}")
        if self.max_seq_length < 8:
            raise ConfigError(f"trainer.max_seq_length must be >= 8 (room for the special tokens and some text), "
                              f"got {self.max_seq_length}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataLimits":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class TaskData:
    spec: TaskSpec
    train: TokenizedSplit
    evals: dict[str, TokenizedSplit]  # eval split name → data
    sources: dict[str, str]


def load_task_data(spec: TaskSpec, tokenizer, max_length: int, glue_dir: Path | None, cache_dir: Path | None,
                   max_train_samples: int | None = None, max_eval_samples: int | None = None,
                   data_seed: int = 0) -> TaskData:
    train_ex = load_split_examples(spec, "train", glue_dir)
    eval_ex = {s.name: load_split_examples(spec, s.name, glue_dir) for s in spec.eval_splits}
    train = tokenize(train_ex, tokenizer, max_length, spec.is_regression, cache_dir)
    train = train.subset(sample_indices(len(train), max_train_samples, data_seed))
    evals = {}
    for name, ex in eval_ex.items():
        tok = tokenize(ex, tokenizer, max_length, spec.is_regression, cache_dir)
        evals[name] = tok.subset(sample_indices(len(tok), max_eval_samples, data_seed))
    sources = {"train": train_ex.source, **{k: v.source for k, v in eval_ex.items()}}
    return TaskData(spec, train, evals, sources)
