"""Evaluations of trained models: privacy audits (`privacy.py`), and the other audits beside it."""
