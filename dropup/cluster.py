"""`python -m dropup.cluster up|down|status`: the local SLURM test cluster's command (`dropup.tools.slurm_cluster`)."""

import sys

from dropup.tools.slurm_cluster import main

if __name__ == "__main__":
    sys.exit(main())
