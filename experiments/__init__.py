"""Experiment tooling on top of DVC's results: the demo, the report's tables, the HTML report."""
