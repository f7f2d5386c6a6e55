"""`titans label --state DIR`: the state a scheduled labeling job keeps across runs.

store.py (generations, the pointer commit, the lock, checks), pointer.py (current.json),
pool.py (the pool's columns and cap), history.py (the per-run table and history.png).
Imports storage (transforms.io) and pipeline.output_lock only; pipeline.label imports it.
"""
