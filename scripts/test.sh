#!/usr/bin/env bash
# The whole test suite: static checks, then pytest. Uses DATABASE_URL / REDIS_URL
# when set (CI: the machine's PostgreSQL and Redis), embedded defaults otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
# Idle OpenMP threads yield instead of spinning: torch and the worker processes share 2 cores.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# MKL in strict reproducibility mode in every process (pytest, workers, builds): sums do not depend
# on the thread count, so a worker's result equals the same call in the test process bit for bit.
export MKL_CBWR=${MKL_CBWR:-AUTO,STRICT}

# Debian's chromium for the browser tests (never a tool's own browser download).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will fail" >&2
  fi
fi

# Debian's nginx-light for the front-server test of docs/deploy.md (X-Accel-Redirect); skipped without it.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null) \
      || echo "warning: could not install nginx-light; the X-Accel-Redirect test will skip" >&2
  fi
fi

echo "== ruff"; "$BIN/ruff" check .
echo "== import contracts"; "$BIN/lint-imports"
echo "== pytest"
exec "$BIN/pytest" -q "$@"
