"""Experiments over many runs: sweep specs, the Optuna sweep that runs them, and the leaderboard and report."""
