"""Offline evaluation (``dice-ds eval``): digits metrics of the shipped model (``metrics``,
``classifier``), the full-scale FID-50K path (``fid``) and the quality sweep over parallel modes
(``sweep``); ``cli.main`` is the entry point. Importing this package imports nothing heavy."""
