"""Entry point: `python run.py [overrides]` or `python run.py -m <sweep>`. All logic is in dropup.stages."""

import hydra
from omegaconf import DictConfig

from dropup.schema import register_configs
from dropup.stages import run

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    return run(cfg)


if __name__ == "__main__":
    main()
