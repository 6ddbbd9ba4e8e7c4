# One image for web, worker and beat; the command picks the role (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HUB_HOME=/data
WORKDIR /app

# The same lock as `make serve` (docs/install.md): every package at its locked version with its
# hash checked, nothing resolved at build time. torch sits outside the lock: the CPU build by
# default; a GPU worker image sets TORCH_INDEX to a CUDA wheel index, whose torch brings its
# CUDA libraries as its own dependencies.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements/runtime.lock ./requirements/
RUN pip install --require-hashes --no-deps -r requirements/runtime.lock \
    && pip install --index-url ${TORCH_INDEX} torch==2.13.0

COPY pyproject.toml README.md ./
COPY hub ./hub
COPY workers ./workers
COPY adapters_ops ./adapters_ops
COPY kernels ./kernels
COPY frontend ./frontend
COPY manage.py ./
RUN pip install --no-deps --no-build-isolation . && pip check && python manage.py collectstatic --noinput -v0 \
    && useradd --create-home hub && mkdir -p /data && chown hub /data
# Production: the settings refuse to start without a real SECRET_KEY (compose.yaml requires one).
ENV DEBUG=0
USER hub

EXPOSE 8000
CMD ["gunicorn", "hub.wsgi:application", "-b", "0.0.0.0:8000", "-k", "gthread", "--threads", "8", "--timeout", "600"]
