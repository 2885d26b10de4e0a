"""Monitoring: metric logging (JSONL, TensorBoard, progress)."""
