# megaflow on the NVIDIA PyTorch container (CUDA, cuDNN, NCCL, Transformer Engine and NVIDIA's torch build).
#   docker build -t megaflow .
#   docker run --rm megaflow                                   # smoke: python -m megaflow --help
#   docker run --gpus all --rm megaflow python -m megaflow train pretrain --config configs/stages/pretrain-tiny.yaml
# For SLURM (pyxis/enroot): enroot import -o megaflow.sqsh dockerd://megaflow, then CONTAINER=$PWD/megaflow.sqsh
# with the scripts in examples/slurm/ (docs/slurm.md).
#
# Base image: release 26.06 (Python 3.12, CUDA 13.3, torch 2.13.0a0+8145d630e8), pinned by the digest of
# its multi-architecture index (linux/amd64 and linux/arm64). The digest was taken from public projects
# that pin this tag, not read from the registry here; check it with any of
#   docker buildx imagetools inspect nvcr.io/nvidia/pytorch:26.06-py3     (the "Digest:" line)
#   crane digest nvcr.io/nvidia/pytorch:26.06-py3
#   skopeo inspect --format '{{.Digest}}' docker://nvcr.io/nvidia/pytorch:26.06-py3
# A wrong digest cannot build a different image: the pull fails with "manifest unknown".
FROM nvcr.io/nvidia/pytorch:26.06-py3@sha256:43c018d6a12963f1a1bad85ef8574b5c2a978eec2be0ebcacfb87f69e0d210e1

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/megaflow

# Keeping the container's torch. The image sets PIP_CONSTRAINT=/etc/pip/constraint.txt, which pins every
# package it ships, torch included (a pre-release build, 2.13.0a0+<commit>). megaflow asks for torch>=2.6
# and megatron-core for torch>=2.6.0, with no upper bound: the installed pre-release satisfies both (pip
# accepts an installed pre-release for such a requirement without --pre), so pip leaves it alone, and the
# constraint file would refuse any other torch anyway. tests/unit/test_deploy.py runs both pip lines below
# with --dry-run against a fake installed torch 2.13.0a0+..., with and without a constraint file and with
# a newer torch on offer, and checks that neither line would install torch.
#
# megatron-core first, in its own layer (cached across source edits). --no-deps: its requirements (torch,
# numpy, packaging) come from the container; --no-build-isolation builds against the container's torch
# should pip ever fall back to the source distribution.
RUN pip install --no-build-isolation --no-deps "megatron-core==0.19.2"

COPY . /opt/megaflow

# megaflow itself, editable, plus its small pure-Python dependencies that the container lacks (omegaconf,
# tokenizers, sentencepiece, ...), under the container's constraint file. --no-build-isolation builds with
# the container's setuptools (an isolated build would also be held to the constraint file, which pins
# setuptools): pyproject's `license = "Apache-2.0"` needs setuptools>=77.
RUN pip install --no-build-isolation -e . \
 && python -c "import importlib.metadata as m; print('torch', m.version('torch'), '| megatron-core', m.version('megatron-core'))"

# Smoke check: the CLI starts and both packages import (no GPU needed at build time).
RUN python -m megaflow --help && python -c "import megatron.core, megaflow"

CMD ["python", "-m", "megaflow", "--help"]
