"""The bottom layer: errors, the option schema and trial, result records, paths, statistics. No torch."""
