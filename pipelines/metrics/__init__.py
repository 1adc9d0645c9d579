"""Scores for pipelines/evaluate.py, one module per task family: VQA, multiple choice and POPE, ASR, forecasting."""
