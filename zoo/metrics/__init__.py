"""Metrics that torchmetrics lacks: ranking scores for recommenders."""
