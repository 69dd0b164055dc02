"""The docs/results.md pipeline behind scripts/make_results.py: `settings` (method rows,
budgets, steps), `run` (the cached steps), `rows` and `targets` (numbers and verdicts read
from the steps' files), `render` (the markdown and its figures). A script of the source tree,
not part of the installed package: it reads recipes/ beside it."""
