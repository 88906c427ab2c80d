"""Tokenizers, raw text -> indexed datasets, pretraining datasets."""
