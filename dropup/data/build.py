"""`make data` / `python -m dropup.data.build [overrides]`: prepare the corpus a config names, then exit.

e.g. `python -m dropup.data.build data=jsonl 'data.path=corpus/*.jsonl.gz' data.num_proc=16`. A killed build
resumes when rerun with the same overrides. Nothing imported here imports torch: where workers are spawned rather
than forked (macOS, Windows) they re-import this module, and must start light.
"""

import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from dropup.data import prepared_data_dir
from dropup.data.corpus import DataError
from dropup.data.sources import SourceError
from dropup.schema import compose


def main(argv: list[str]) -> int:
    try:
        path = prepared_data_dir(compose(argv), log=print)
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
