"""Prefect orchestration over the plain stage functions of `pipeline/`. The only package that imports prefect.

Settings that must be in place before `import prefect` (../shared/notes/stack.md): telemetry off (its writes
cause "database is locked" on the temporary server's SQLite) and a start-up timeout long enough for a cold
start of the temporary local server on a 2-core machine. A user's own environment variables win.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The temporary server runs background services on its SQLite file while the pipeline runs; under load the
# automations service (triggers) failed with "database is locked" and printed a traceback. The pipeline uses no
# automations and reads no events back, so those services are off, and SQLite waits longer before giving up.
os.environ.setdefault("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", "60")

# Process-wide CPU settings (subnormals flushed) before any thread starts, so every thread of the flow has them.
from pipeline.runtime import configure_process  # noqa: E402

configure_process()
