"""One thin Celery task per op: `ops.<name>` in `workers/ops/<name>.py`, whose
body is `runner.run(job_id, fn)`. Each op's declaration
(adapters_ops/opspecs.py) names its queue and limits; the app imports the modules it lists."""
