"""Orchestration: the run's plan (the mode's steps), the phases' message exchanges, and the run's strategy."""
