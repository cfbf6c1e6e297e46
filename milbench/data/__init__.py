"""Shared data helpers for dataset plugins: data roots, bag sampling, file readers."""
