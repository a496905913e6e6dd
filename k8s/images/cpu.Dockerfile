# tfllm for CPU nodes (cpu-smoke overlay, TensorBoard). Build from the repository root:
#   docker build -f k8s/images/cpu.Dockerfile -t tfllm-cpu .
# The install is the one CI tests: .ci/install.sh (system packages, venv, Horovod from source).
FROM python:3.11.11-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV TFLLM_VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# MPI's transport between pods is SSH (mpi-operator); the rest comes from the install script.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-server openssh-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tfllm
COPY setup.cfg pyproject.toml README.md Makefile ./
COPY .ci ./.ci
COPY tfllm ./tfllm
COPY pipelines ./pipelines
COPY flags ./flags
RUN bash .ci/install.sh \
    && rm -rf /root/.cache /var/lib/apt/lists/*

COPY k8s/images/ssh_config /etc/ssh/ssh_config.d/tfllm.conf
RUN useradd --create-home --uid 1000 --user-group mpiuser \
    && mkdir -p /etc/tfllm \
    && chown mpiuser:mpiuser /etc/tfllm
COPY --chown=mpiuser:mpiuser k8s/images/sshd_config /home/mpiuser/.sshd_config

USER 1000:1000
WORKDIR /etc/tfllm
CMD ["python", "-m", "pipelines.pretrain", "--helpshort"]
