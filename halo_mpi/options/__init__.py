"""The options every mode is opened with: declared once (tree.py), parsed into typed values
(values.py) by flags the declarations carry (flags.py)."""
