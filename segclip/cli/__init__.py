"""Thin typer command-line interfaces: each calls one importable function (docs/architecture.md)."""
