"""Training: the loop (`trainer.py`) and atomic checkpoints (`checkpoint.py`)."""
