"""Experiments that run the whole recipe: the VPD demo (traces -> models -> evaluation -> report)."""
