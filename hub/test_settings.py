"""Settings for the test suite: the real settings on a throw-away HUB_HOME.

Worker processes started by tests get the same HUB_HOME and database through
the environment (see tests/conftest.py), so they share blobs and rows.
"""

import os
import tempfile

os.environ.setdefault("HUB_HOME", tempfile.mkdtemp(prefix="hub-test-"))

from hub.settings import *  # noqa: E402,F403
from hub.settings import DATABASES, HUB_HOME, REST_FRAMEWORK  # noqa: E402

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not :memory:, so worker subprocesses see the same test database.
    DATABASES["default"]["TEST"] = {"NAME": str(HUB_HOME / "test.sqlite3")}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
REST_FRAMEWORK = {**REST_FRAMEWORK, "DEFAULT_THROTTLE_CLASSES": []}

# Test receivers listen on 127.0.0.1; one test turns this off again.
WEBHOOK_ALLOW_PRIVATE = True
