"""Benchmarks: each script measures one claim and writes JSON + Markdown under results/."""
