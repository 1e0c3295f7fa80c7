"""`make data` / `python -m dropup.data.build [overrides]`: prepare the corpus a config names, then exit.

e.g. `python -m dropup.data.build data=jsonl 'data.path=corpus/*.jsonl.gz' data.num_proc=16`. A killed build
resumes when rerun with the same overrides. Imports stay inside main(): where workers are spawned rather than forked
(macOS, Windows) they re-import this module, and must not pay for torch.
"""

import sys


def main(argv: list[str]) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dropup.data.corpus import DataError
    from dropup.data.sources import SourceError
    from dropup.stages import register_configs
    from dropup.train import ROOT, prepared_data_dir

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv)
        path = prepared_data_dir(cfg, log=print)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # hydra's message spans lines: one line
        return 2
    except (DataError, SourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
