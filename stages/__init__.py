"""The pipeline, one module per DVC stage, in order (each runs as `python -m stages.<name>`):

download -> filter -> crop -> split -> resample -> train -> evaluate
"""
