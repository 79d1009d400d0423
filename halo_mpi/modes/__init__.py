"""The mode layer: one call opens any mode from typed options (open.py), and every mode answers
the same calls (engine.py): single.py, tensor.py, pipeline.py."""
