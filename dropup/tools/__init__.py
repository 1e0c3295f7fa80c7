"""Tools beside the library, each with its own command: the scaling planner (`python -m dropup.scaling`) and the
local SLURM test cluster (`python -m dropup.cluster`). Nothing in the library imports them."""
