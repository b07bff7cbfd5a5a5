"""The shared training loop (``python -m medvl_jax.train``).

task.py (what a task provides) · state.py (train state, shape-first sharded init, pretrained
merge) · optim.py (AdamW, schedules, clipping, freezing, lr groups) · checkpoint.py (Orbax,
data state, metadata) · metrics.py (JSONL, TensorBoard, progress) · loop.py (the loop) ·
cli.py (command line, task table).
"""
