"""`python -m starcoder_tp.serve`: how another commit's A/B driver starts this commit's side B.
Its path is part of the A/B protocol (a commit without it predates the protocol), so it stays
here; the server itself is the suite's (suite/serve.py)."""
import sys

if __name__ == "__main__":
    from starcoder_tp.suite.serve import main

    sys.exit(main())
