"""Downstream evaluation with lm-evaluation-harness: the `LM` adapter over a model in memory (`adapter`), the
tasks a run scores (`tasks`), and scoring during training (`scoring`)."""
