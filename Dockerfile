# CUDA comes with the torch wheel (its nvidia-* dependencies); the host needs only the NVIDIA driver and
# the container toolkit: docker run --gpus all ...
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY zoo ./zoo
COPY configs ./configs
COPY train.py evaluate.py ./
RUN pip install -e .

CMD ["python", "train.py"]
