"""`make data` / `python -m dropup.data.build [overrides]`: prepare the corpus a config names, then exit."""

import sys

from hydra import compose, initialize_config_dir

from dropup.data import ensure_prepared
from dropup.data.corpus import DataError
from dropup.data.sources import SourceError
from dropup.stages import register_configs
from dropup.train import ROOT, project_path


def main(argv: list[str]) -> int:
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv)
    data_cfg = dict(cfg.data)
    if data_cfg.get("path"):
        data_cfg["path"] = str(project_path(data_cfg["path"]))
    try:
        path = ensure_prepared(data_cfg, project_path(cfg.paths.data_dir))
    except (DataError, SourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
