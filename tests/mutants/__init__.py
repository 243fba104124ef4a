"""`make mutants`: the suite must catch deliberately broken implementations (see run.py)."""
