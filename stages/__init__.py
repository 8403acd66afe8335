"""The pipeline, one module per DVC stage, in order (each runs as `python -m stages.<name>`):

check -> weights, download -> filter -> crop -> split -> resample -> train -> evaluate -> localize
"""
