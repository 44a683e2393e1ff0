"""starcoder_tp: a small tensor-parallel inference runtime for GPTBigCode (StarCoder) checkpoints."""

__version__ = "0.1.0"
