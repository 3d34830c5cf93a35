"""What the tests share: tiny models, a tiny end-to-end run, reward functions named in recipes, and the
key checks of each scheme (imported by tests/test_keys.py)."""
