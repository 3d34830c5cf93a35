"""Running model-written and training-data programs: the sandbox, the code benchmarks' problems and how a
completion becomes programs, and judging generations files. Used by training rewards and by evaluation; it
imports neither (docs/architecture.md)."""

BENCHMARKS = ("mbpp", "humaneval", "codecontests")
