"""Parts of a training loop that know no weighting scheme: the checkpoint format, head-quality validation,
the optimizer and schedule, early stopping."""
