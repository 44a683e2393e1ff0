"""Ranks from torchrun's environment instead of the runtime's own worker group."""
import json
import os
import subprocess
import sys
from pathlib import Path

from starcoder_tp.runners import HFRunner

REPO = Path(__file__).resolve().parent.parent


def test_torchrun_two_ranks_match_transformers(embedded_dir, prompts):
    ids_file = Path(os.environ["STARCODER_TP_CACHE"]) / "torchrun_ids.json"
    ids_file.write_text(json.dumps(prompts))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "starcoder_tp", "generate", "--model-dir", str(embedded_dir), "--input-ids-file", str(ids_file),
           "--max-new-tokens", "24", "--ignore-eos", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout)  # only rank 0 prints
    assert payload["output_ids"] == HFRunner(embedded_dir).generate_greedy(prompts, 24).output_ids
