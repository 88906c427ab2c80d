"""Evaluation: perplexity now; exact match, reward accuracy, win rate and lm-eval follow."""
