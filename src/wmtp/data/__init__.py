"""Data: sources and their readers (`sources`), tokenised sequences and labels (`sequences`), the step plan
(`steps`)."""
