"""The client runtime: what one Flower client builds and trains in each mode, and the state it keeps private."""
