"""What the tests share, in one place: builders of tiny models and data (builders), the command run in this
process or in its own (commands), processes and their children (processes), and cache comparisons (caches).
Fixtures live in tests/conftest.py; no test module imports another."""
