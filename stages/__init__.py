"""Reproducible NIH ChestX-ray14 experiments: one module per DVC stage, in pipeline order.

download -> filter -> crop -> split -> resample -> train -> evaluate
"""
