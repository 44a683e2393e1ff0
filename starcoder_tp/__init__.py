"""starcoder_tp: a small tensor-parallel inference runtime for StarCoder (GPTBigCode) checkpoints.

The runtime is this package's top level; the performance and accuracy suites built on it are
in `starcoder_tp.suite`, and the helpers of the tests (reference runners, fixture builders) in
`starcoder_tp.testing`. The runtime imports neither."""
import sys

__version__ = "0.1.0"


def log(message: str) -> None:
    """Progress and diagnostics, on stderr: stdout is kept for results (`generate --json`)."""
    print(message, file=sys.stderr, flush=True)
