# syntax=docker/dockerfile:1
#
# CRSM server images. Two targets:
#   docker build -t crsm-server:gpu .                 CUDA, mamba-ssm + causal-conv1d built for sm_90
#   docker build -t crsm-server:cpu --target cpu .    CPU only (reference backbone)
# Run:  docker run --gpus all -p 8000:8000 -v /path/to/model:/models:ro --env-file crsm.env crsm-server:gpu
# The images listen on 0.0.0.0 (every interface of the container) and accept any Host header: give the
# server an API key, CRSM_API_KEY, from a secret at run time (an --env-file kept out of the repository,
# compose's .env, a Kubernetes Secret), never in the image. Without one, anyone who reaches the port can
# use the API. /health, /ready and /metrics stay open for probes and Prometheus.
# docs/deployment.md has the details and what was checked without a Docker engine.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
ARG PYTHON_VERSION=3.12

# ------------------------------------------------------------------------------------------------
# CPU image: a slim Python base and the CPU build of torch.
FROM python:${PYTHON_VERSION}-slim AS cpu-build
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ARG TORCH_VERSION=2.9.1
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_CPU_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
# the package sources only: .dockerignore lets nothing else into the build context
COPY . ./
# hadolint ignore=DL3013
RUN pip install .

FROM python:${PYTHON_VERSION}-slim AS cpu
RUN useradd --create-home --uid 10001 --user-group crsm \
 && mkdir -p /models && chown crsm:crsm /models
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/crsm
EXPOSE 8000
# /health answers as soon as the process serves (model loading or not); /ready is for traffic.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# CRSM_API_KEY: see the top of this file
ENTRYPOINT ["crsm", "serve"]
CMD ["--model", "/models", "--host", "0.0.0.0", "--port", "8000"]

# ------------------------------------------------------------------------------------------------
# GPU build stage: nvcc from the CUDA devel image compiles the CUDA extensions against torch.
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS gpu-build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
# torch's default Linux wheel is built for CUDA 12.8 (its CUDA libraries come as wheels); the
# check makes a mismatch with this image's nvcc fail here rather than in the extension builds.
ARG CUDA_VERSION
ARG TORCH_VERSION=2.9.1
RUN pip install "torch==${TORCH_VERSION}" setuptools==84.2.1 wheel==0.48.0 packaging==26.3 ninja==1.13.2 \
 && python -c "import sys, torch; cuda = torch.version.cuda or ''; \
print('torch', torch.__version__, 'cuda', cuda); \
sys.exit(0 if cuda.split('.')[0] == '${CUDA_VERSION}'.split('.')[0] else 'torch CUDA major != nvcc CUDA major')"

# Only the GPU architectures named here (9.0 = H100/H200). Their setup.py files hard-code a list of
# -gencode flags for every architecture; cuda_arch_only.py removes it so this list decides.
ARG TORCH_CUDA_ARCH_LIST="9.0"
ARG MAX_JOBS=8
ARG MAMBA_SSM_VERSION=2.3.2.post1
ARG CAUSAL_CONV1D_VERSION=1.7.0
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} MAX_JOBS=${MAX_JOBS} \
    MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
COPY deploy/docker/cuda_arch_only.py /tmp/cuda_arch_only.py
WORKDIR /tmp/ext
RUN pip download --no-deps --no-binary :all: --no-build-isolation \
      "mamba-ssm==${MAMBA_SSM_VERSION}" "causal-conv1d==${CAUSAL_CONV1D_VERSION}" \
 && for sdist in ./*.tar.gz; do tar xzf "$sdist"; done \
 && python /tmp/cuda_arch_only.py ./*/setup.py \
 && for src in ./*/; do pip wheel --no-deps --no-build-isolation -w /tmp/wheels "$src"; done

WORKDIR /src
# the package sources only: .dockerignore lets nothing else into the build context
COPY . ./
# hadolint ignore=DL3013
RUN pip install /tmp/wheels/*.whl ".[gpu]" \
 && python -c "import mamba_ssm, causal_conv1d; print('mamba_ssm', mamba_ssm.__version__)"

# ------------------------------------------------------------------------------------------------
# GPU runtime image (the default target). Triton compiles small launcher stubs with the C compiler
# and the Python headers at first use, so those stay in the image.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS gpu
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --user-group crsm \
 && mkdir -p /models && chown crsm:crsm /models
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    TRITON_CACHE_DIR=/home/crsm/.triton/cache
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/crsm
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# CRSM_API_KEY: see the top of this file
ENTRYPOINT ["crsm", "serve"]
CMD ["--model", "/models", "--host", "0.0.0.0", "--port", "8000"]
