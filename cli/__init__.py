"""The command line `cxr` (cli/app.py): the layer above the pipeline's stages and the experiment tools."""
