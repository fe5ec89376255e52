"""Evaluation: what a customization is measured by (pair metrics and the step-0 baseline, KL to the
base, likelihoods, greedy answers), learning curves, the knowledge probe and the lm-eval model.
Imports the library and the kernels, never the experiments."""
