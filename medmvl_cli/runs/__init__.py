"""The run folder as a file format (CONTRACT §4), shared by training, inference and interop.

- `folder.py`: the layout, the marker, preparing / finishing a run folder.
- `checkpoint.py`: checkpoint checksums, choosing and verifying the checkpoint to resume from.
- `resolve.py`: which model a command uses (--model, $MEDMVL_MODEL, the newest finished run).
"""
