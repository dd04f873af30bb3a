"""Reporting: the round log, the run folder's summary and metrics files, plots, trackers and the quiet log."""
