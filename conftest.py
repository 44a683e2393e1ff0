"""The suite's pytest plugin lives in starcoder_tp/suite/pytest_plugin.py (importable by name,
unlike a conftest, and registered through the package's pytest11 entry point when installed);
loading it here too makes its options, fixtures and summaries available to tests/, tests_perf/
and tests_accuracy/ in a checkout that is not installed."""

pytest_plugins = ["starcoder_tp.suite.pytest_plugin"]
