"""Checkpoint I/O at real size: streaming readers, the load plan, the random-checkpoint writer."""
