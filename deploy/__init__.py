"""Deployment helpers: the exact SuperLink / SuperNode command lines (shared by the loopback test and docker/)."""
