"""Inference sizing behind scripts/size.py: model shapes, device specs, measured points, the roofline model,
traffic arithmetic, the choice of configuration and its plot. Importable without a server."""
