"""Command-line entry points: `meshd` and `meshctl` (argument parsing only)."""
