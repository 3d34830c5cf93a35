"""The MTP model (`mtp`), building it from a config (`build`), parallelising it (`parallelize`), Meta's
release (`meta`) and its memory plan (`memory`)."""
