"""Traces in, policy artifacts out: load, fit, evaluate, bench."""
