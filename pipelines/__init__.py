"""absl entry points: `python -m pipelines.<name> --flagfile=flags/<config>.cfg`."""
