# tfllm for NVIDIA GPU nodes: Horovod with NCCL. Build from the repository root:
#   docker build -f k8s/images/gpu.Dockerfile -t tfllm-gpu .
# CUDA 12 to match the nvidia-*-cu12 libraries that TensorFlow 2.21's [and-cuda] extra installs
# (tests/k8s_test.py checks the two agree); the devel image brings nvcc for Horovod's build.
# The install is the one CI tests: .ci/install.sh --gpu (the recipe `make gpu-build-check` compiles).
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV TFLLM_VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CUDA_HOME=/usr/local/cuda \
    HOROVOD_BUILD_CUDA_CC_LIST=80,90 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv python3-dev openssh-server openssh-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tfllm
COPY setup.cfg pyproject.toml README.md Makefile ./
COPY .ci ./.ci
COPY tfllm ./tfllm
COPY pipelines ./pipelines
COPY flags ./flags
RUN bash .ci/install.sh --gpu \
    && rm -rf /root/.cache /var/lib/apt/lists/*

COPY k8s/images/ssh_config /etc/ssh/ssh_config.d/tfllm.conf
# Ubuntu 24.04 images ship a uid-1000 user "ubuntu"; mpi-operator expects mpiuser's home.
RUN (userdel --remove ubuntu || true) \
    && useradd --create-home --uid 1000 --user-group mpiuser \
    && mkdir -p /etc/tfllm \
    && chown mpiuser:mpiuser /etc/tfllm
COPY --chown=mpiuser:mpiuser k8s/images/sshd_config /home/mpiuser/.sshd_config

USER 1000:1000
WORKDIR /etc/tfllm
CMD ["python", "-m", "pipelines.pretrain", "--helpshort"]
