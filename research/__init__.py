"""Research extras: baselines, studies, benchmarks, plots and comparisons. They import the core;
the core imports none of them at the top of a file (train.py loads research.prune for --prune and
research.neuron_sparsity for --mlp_keep, only when the flag is given). Run one from the repository root as `python -m research.NAME`."""
