"""Experiments: the main job (demo) and its built-in task, the comparison with SFT and DPO, and
the lm-eval runner with its shipped tasks. Built on evaluation and the library."""
