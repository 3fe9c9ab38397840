"""Shared fixtures. Everything runs offline: no model hub, no network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LANCE_LOG", "error")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect.logging.configuration import ensure_logging_setup

# Prefect's console handler keeps the sys.stderr of the moment its logging is set up (the first `from prefect import
# flow`). Set up here, that is the session's capture; set up inside a test using capsys, it was that test's stream,
# closed after it, and every later Prefect log line in the worker failed ("I/O operation on closed file").
ensure_logging_setup()
