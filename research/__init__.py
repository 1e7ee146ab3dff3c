"""Research extras: baselines, studies, benchmarks, plots and comparisons. They import the core;
the core never imports them. Run one from the repository root as `python -m research.NAME`."""
