"""The suite's pytest plugin lives in starcoder_tp/pytest_plugin.py (importable by name from the
tests, unlike a conftest); loading it here makes its options, fixtures and summaries available
to tests/, tests_perf/ and tests_accuracy/."""

pytest_plugins = ["starcoder_tp.pytest_plugin"]
