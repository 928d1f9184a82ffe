"""Which Keras backends are installed here, and running a worker module under each (one process each:
Keras fixes its backend at import)."""
import importlib.util
import json
import os
import subprocess
import sys

BACKENDS = ("jax", "torch", "tensorflow")
RECORD = "@@record "  # worker lines starting with this carry one JSON record


def installed_backends():
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def emit(**record):
    """Called in a worker: hand one record to the parent."""
    print(RECORD + json.dumps(record), flush=True)


def run_worker(backend, module, args=(), echo=None, on_record=None):
    """Run `python -m module *args` with KERAS_BACKEND=backend; return its records (and its exit code).

    Lines that are not records are passed to `echo` (e.g. print) as they come; records to `on_record`, if
    given, as they come (e.g. to drive a progress bar)."""
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    records = []
    for line in proc.stdout:
        if line.startswith(RECORD):
            records.append(json.loads(line[len(RECORD):]))
            if on_record is not None:
                on_record(records[-1])
        elif echo is not None:
            echo(line.rstrip("\n"))
    return records, proc.wait()


def device_of(x):
    """"gpu" or "cpu": where a backend tensor lives."""
    text = str(getattr(x, "device", "cpu")).lower()
    return "gpu" if ("cuda" in text or "gpu" in text) else "cpu"
