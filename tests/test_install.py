"""An installed copy works without the checkout: `pip install .` (a wheel, not the editable install the suite
otherwise runs from) carries the Hydra configs inside the package, so `python -m train` composes and trains, and
the code that reads conf/ without Hydra (tasks, method YAMLs, the reporter's task facts) finds it there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from test_sweep import SMALL


def test_a_wheel_install_trains_from_outside_the_checkout(tmp_path, fixture_glue_dir):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True,
                   cwd=tmp_path, capture_output=True)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))], check=True,
                   cwd=tmp_path, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the editable install's path to the checkout
    probe = ("import json, train, report, lorabench.validate as v, lorabench.data as d; "
             "print(json.dumps([train.__file__, report.__file__, str(v.CONF_DIR), d.load_task_spec('rte').name]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True, check=True)
    train_file, report_file, conf_dir, task = json.loads(out.stdout)
    for path in (train_file, report_file, conf_dir):
        assert Path(path).is_relative_to(site), f"{path} is not the installed copy's"
    assert (Path(conf_dir) / "config.yaml").is_file() and task == "rte"

    p = subprocess.run([sys.executable, "-m", "train", "method=lora", "task=rte", *SMALL,
                        f"data.glue_dir={fixture_glue_dir}", f"hydra.run.dir={work / 'run'}"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((work / "run" / "results.json").read_text())["status"] == "ok"
