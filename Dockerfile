# megaflow on the NVIDIA PyTorch container (CUDA, cuDNN, NCCL, Transformer Engine and NVIDIA's torch build).
#   docker build -t megaflow .
#   docker run --gpus all --rm megaflow python -m megaflow train pretrain --config configs/stages/pretrain-tiny.yaml
# The container pins every package it ships in $PIP_CONSTRAINT (/etc/pip/constraint.txt), its torch
# included, so nothing below can replace that torch: megaflow asks for torch>=2.6 with no upper bound,
# which the container's pre-release build satisfies.
# TODO digest: pin as nvcr.io/nvidia/pytorch:26.06-py3@sha256:... once the digest has been read from the
# registry (docker buildx imagetools inspect nvcr.io/nvidia/pytorch:26.06-py3).
FROM nvcr.io/nvidia/pytorch:26.06-py3

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/megaflow

# megatron-core alone first (its own layer, cached across source edits). --no-deps: its requirements
# (torch, numpy, packaging) come from the container; --no-build-isolation builds against the container's
# torch should pip ever fall back to the source distribution.
RUN pip install --no-build-isolation --no-deps "megatron-core==0.19.2"

COPY . /opt/megaflow

# megaflow itself, editable, plus its small pure-Python dependencies that the container lacks (omegaconf,
# tokenizers, sentencepiece, ...). --no-build-isolation uses the container's setuptools, which the
# constraint file pins anyway (pyproject's `license = "Apache-2.0"` needs setuptools>=77).
RUN pip install --no-build-isolation -e . \
 && python -c "import importlib.metadata as m; print('torch', m.version('torch'), '| megatron-core', m.version('megatron-core'))"

# Smoke check: the CLI starts and both packages import (no GPU needed at build time).
RUN python -m megaflow --help && python -c "import megatron.core, megaflow"

CMD ["python", "-m", "megaflow", "--help"]
