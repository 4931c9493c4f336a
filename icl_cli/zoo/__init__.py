"""Bundled models and dictionaries: the toy ICL model (``toy-icl``), the script that trains it, and
its dictionary suite. Reads the built-in tasks; writes an HF model folder and SAELens folders.

    step.py  train_toy, evaluate_toy (icl zoo train / eval)
"""
