"""absl entry points: `python -m pipelines.<name> --flagfile=flags/<config>.cfg`."""

from tfllm.malloc import preload_tcmalloc

preload_tcmalloc()  # before TensorFlow loads: see tfllm/malloc.py
