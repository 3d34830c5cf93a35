"""Plumbing that knows no model: processes and collectives, dtypes, storage and its mirror, tracking and
run records, atomic writes."""
