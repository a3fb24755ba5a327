"""Measuring one tower: the timed loop, steps, FLOPs, roofline, memory, footprint, capacity, profiles."""
