"""Stand-in of Forge's ``backend.nn`` (see tests/forge/README.md)."""
