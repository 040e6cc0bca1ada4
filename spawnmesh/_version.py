"""The package version, single source for the wheel and `spawnmesh version`."""

__version__ = "0.1.0"
