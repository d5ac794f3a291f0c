"""`python -m train [overrides]`: fine-tune one configuration (or a sweep with -m). See README.md."""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lorabench import rundir

# The default run and sweep directories are claimed atomically, so that runs started in the same second never share
# one (see lorabench/rundir.py). Cached: every evaluation in this process, and in each job's copy of the config,
# gives the directory claimed first.
OmegaConf.register_new_resolver(rundir.RESOLVER, rundir.unique_dir, use_cache=True, replace=True)


@hydra.main(version_base="1.3", config_path="lorabench/conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the job's primary dev metric at its best evaluation (NaN when it did not finish): what an optimizing
    sweeper (`hydra/sweeper=optuna`) maximizes."""
    from lorabench.cli import run_configured_job
    from lorabench.tuning import objective_value

    hc = HydraConfig.get()
    in_sweep = hc.mode == RunMode.MULTIRUN

    def resolved_config() -> dict:
        config = OmegaConf.to_container(cfg, resolve=True)
        if in_sweep and config.get("group") is None:
            config["group"] = hc.sweep.dir.rstrip("/").split("/")[-1]
        if config.get("run_name") is None:
            # Dashboard name = the command-line overrides without the seed, so a config's seeds share one name.
            shown = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") != "seed"]
            config["run_name"] = ",".join(shown) or None
        return config

    # Resolved inside the job's error handling: in a sweep, a config that fails to resolve fails only its job.
    grid = hc.sweeper.get("params") if "sweeper" in hc else None
    results = run_configured_job(resolved_config, hc.runtime.output_dir, in_sweep=in_sweep,
                                 composed=OmegaConf.to_container(cfg, resolve=False),
                                 sweep_grid=OmegaConf.to_container(grid) if grid else None)
    return objective_value(results)


if __name__ == "__main__":
    from lorabench.cli import guard_hydra_main  # Hydra's own failures as one `error:` line (see cli.py)

    guard_hydra_main(main)
