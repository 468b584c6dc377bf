"""Subcommands of the ``rrg3d`` console script (see :mod:`rrg3d.cli`)."""
