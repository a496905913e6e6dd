"""tfllm: GPT-style language models with Keras 3, TensorFlow and Horovod ring-allreduce."""

import os

# TensorFlow's C++ start-up chatter (CPU feature notes, missing CUDA drivers) drowns the
# progress output on every rank; users who want it set TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
