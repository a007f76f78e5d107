# The zoo with its tests: `docker run ... zoo make train`, `docker run ... zoo make test`.
# CUDA comes with the torch wheel (its nvidia-* dependencies); the host needs only the NVIDIA driver and the
# container toolkit (docker run --gpus all ...). Runs write to the volumes /app/logs and /app/data (the cached
# scorers and downloaded datasets), as the user the container runs as: pass --user "$(id -u):$(id -g)" so that the
# files on the host belong to you.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VENV=/opt/venv MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /app

COPY . .
# the environment `make train` and `make test` would create on first use, made once here
RUN make install && mkdir -p logs data && chmod a+rwx logs data
VOLUME ["/app/logs", "/app/data"]

CMD ["make", "train"]
