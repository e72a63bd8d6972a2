"""Stand-in of Forge's ``backend`` package (see tests/forge/README.md)."""
