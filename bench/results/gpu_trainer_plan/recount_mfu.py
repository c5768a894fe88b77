"""MFU of the H200 run recounted with bench/step_profile.py's corrected FLOP count, on the meta
device (no GPU): `python bench/results/gpu_trainer_plan/recount_mfu.py profiles.json`."""

import json
import sys
from pathlib import Path

import torch
from transformers import Gemma3ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import architectures
from bench.step_profile import RATE_TFLOPS, flops_per_sample

config = architectures.config("4b")
with torch.device("meta"):
    model = Gemma3ForConditionalGeneration(config)
out = []
for p in json.loads(Path(sys.argv[1]).read_text()):
    f = flops_per_sample(model, p["tokens_per_example"], 3, answer_only=True)
    useful = f["vision_forward"] + 2 * f["language_forward"]
    out.append(
        {
            "setting": p["setting"],
            "tflop_per_sample": {k: round(v / 1e12, 2) for k, v in f.items()},
            "useful_tflop_per_sample": round(useful / 1e12, 2),
            "samples_per_second": p["samples_per_second"],
            "mfu": round(useful * p["samples_per_second"] / (RATE_TFLOPS * 1e12), 3),
            "mfu_as_printed_in_the_run": p["mfu"],
        }
    )
print(json.dumps(out, indent=1))
