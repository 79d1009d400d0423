"""Weights kept under a memory budget: what stays resident, and the rest streamed while computing."""
