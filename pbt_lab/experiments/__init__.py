"""The commands as thin recipes: a search space and a scheduler over the launcher, then ``cli.finish``.
Each runs as ``python -m pbt_lab.<name>``."""
