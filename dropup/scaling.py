"""`python -m dropup.scaling`: the scaling planner's command (the planner is `dropup.tools.scaling`)."""

import sys

from dropup.tools.scaling.cli import main

if __name__ == "__main__":
    sys.exit(main())
