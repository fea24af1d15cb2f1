"""The GPU benchmark script runs (tiny models, CPU, fp32) and its two pipelines agree: SD1.5 and SDXL
end to end (text encoding, 4 LCM steps with a fused LoRA, VAE decode) against diffusers."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_benchmark_script_smoke():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--tiny", "--device", "cpu",
           "--dtype", "float32", "--runs", "1", "--no-compile", "--no-train"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]          # exits 1 when the latents differ > 1e-3
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| sd15 ", "| sdxl "))]
    assert len(rows) == 2, out.stdout
    diffs = [float(line.rsplit("rel diff ", 1)[1].rstrip(")")) for line in out.stdout.splitlines()
             if "rel diff" in line]
    assert len(diffs) == 2 and max(diffs) <= 1e-3, out.stdout
