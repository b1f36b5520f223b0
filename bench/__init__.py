"""Benchmarks (docs/architecture.md "Layout and packages"): scripts with a `main()`, helpers in
`bench/_*.py`.

A package only so that the helpers import as `bench._stats` etc. from the scripts and the tests.
"""
