# One image for web, worker and beat; the command picks the role (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HUB_HOME=/data
WORKDIR /app

# CPU torch by default; a GPU worker image sets TORCH_INDEX to a CUDA wheel index.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0

COPY pyproject.toml README.md ./
COPY hub ./hub
COPY workers ./workers
COPY adapters_ops ./adapters_ops
COPY kernels ./kernels
COPY frontend ./frontend
COPY manage.py ./
RUN pip install . && python manage.py collectstatic --noinput -v0 \
    && useradd --create-home hub && mkdir -p /data && chown hub /data
USER hub

EXPOSE 8000
CMD ["gunicorn", "hub.wsgi:application", "-b", "0.0.0.0:8000", "-k", "gthread", "--threads", "8", "--timeout", "600"]
