"""Test helpers for running the workflow against a real single-node SLURM on localhost."""
