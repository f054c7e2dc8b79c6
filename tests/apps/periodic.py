"""An app with periodic schedules, for tests/test_schedules.py. The app name comes from
HEDDLE_TEST_APP, so each test has its own schedules, consumer and subjects.

Each run of ``beat`` appends ``{pid} {task id} {Heddle-Schedule header}`` to HEDDLE_TEST_LOG,
so a test counts runs per tick across worker processes. HEDDLE_TEST_EVERY sets the
interval of the ``beat`` schedule (default 1 s); HEDDLE_TEST_EXTRA=1 declares one more
schedule, ``nightly``.
"""

import os

import heddle

app = heddle.Heddle(os.environ.get("HEDDLE_TEST_APP", "periodic"))


@app.task
def beat(label: str) -> str:
    ctx = heddle.current_task()
    path = os.environ.get("HEDDLE_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {ctx.id} {ctx.headers.get('Heddle-Schedule', '-')}\n")
    return label


@app.task
def report(kind: str = "daily") -> str:
    return kind


app.periodic(beat, every=int(os.environ.get("HEDDLE_TEST_EVERY", "1")), args=("tick",), name="heartbeat")
app.periodic(report, cron="*/5 * * * *", tz="Europe/Berlin", kwargs={"kind": "weekly"}, name="weekly-report")
if os.environ.get("HEDDLE_TEST_EXTRA"):
    app.periodic(report, cron="@daily", name="nightly")
