"""A run: its set-up from a config and a recipe (`build`), the training loop (`trainer`) and the sums of a step
(`totals`)."""
