"""Test-only tooling (not installed with the package): sample runs and a headless-browser driver."""
