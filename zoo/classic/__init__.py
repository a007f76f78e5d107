"""Gradient-boosted trees (XGBoost), trained and scored outside Lightning behind the same train.py and evaluate.py."""
