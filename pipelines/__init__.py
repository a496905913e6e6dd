"""Entry points: `python -m pipelines.<name> --flagfile=flags/<config>.cfg` (`--help`: a pipeline's own options)."""

from tfllm.console import quiet_tensorflow
from tfllm.malloc import preload_tcmalloc

preload_tcmalloc()  # before TensorFlow loads: see tfllm/malloc.py
quiet_tensorflow()  # likewise: see tfllm/console.py (--tf_logs or TFLLM_TF_LOGS=1 keeps TensorFlow's lines)
