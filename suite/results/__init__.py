"""The results database and the row helpers that read it."""
