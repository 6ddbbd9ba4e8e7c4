"""One thin Celery task per op: `ops.<name>` in `workers/ops/<name>.py`, whose
body is `runner.run(job_id, fn)`. The catalog (workers/catalog.py) names each
op's queue and limits; the app imports the modules it lists."""
