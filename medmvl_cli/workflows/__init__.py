"""Workflows that chain several engine steps (the quickstart: synthesize, train, answer, score)."""
