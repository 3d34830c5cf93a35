"""Bridges from other training frameworks to wmtp's model, loss and weighting schemes: `hf_trainer`, a Hugging Face
`transformers.Trainer` that trains an `MTPModel` with wmtp's weighted loss (docs/hf-trainer.md)."""
