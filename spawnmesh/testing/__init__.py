"""Test kits shipped with spawnmesh: conformance suites any implementation can run."""
