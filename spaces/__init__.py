"""Hugging Face Spaces deployment: `python -m spaces.deploy --space USER/NAME [--dry-run]`."""
