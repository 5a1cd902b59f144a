"""Inference: answering with a saved model, one request or a whole annotation file."""
