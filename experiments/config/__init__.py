"""The bottom layer: the structured config (schema.py), each key's range (ranges.py) and Hydra's
compose errors (compose_errors.py). Imports nothing of paralab's."""
