"""Recount the per-sample FLOPs of the H200 run with the corrected linear count, on the meta device."""
import json, sys
sys.path.insert(0, "/work/wt/i16")
import torch
from bench.gpu_trainer import gemma3_4b_configs
from bench.step_profile import RATE_TFLOPS, _linear_weights
from transformers import Gemma3Config, Gemma3ForConditionalGeneration
text, vision, tpi, size = gemma3_4b_configs()
cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tpi)
with torch.device("meta"):
    m = Gemma3ForConditionalGeneration(cfg)
profiles = json.load(open(sys.argv[1]))
out = []
for p in profiles:
    T = p["tokens_per_example"]; patches = (vision.image_size // vision.patch_size) ** 2
    vf = 2 * _linear_weights(m.model.vision_tower) * patches + 4 * vision.num_hidden_layers * patches**2 * vision.hidden_size
    lf = 2 * _linear_weights(m.model.language_model) * T + 4 * text.num_hidden_layers * T**2 * text.num_attention_heads * text.head_dim + 2 * text.hidden_size * text.vocab_size * 3
    useful = vf + 2 * lf
    out.append({"setting": p["setting"], "tokens_per_example": T, "vision_forward_tflop": round(vf / 1e12, 2),
                "language_forward_tflop": round(lf / 1e12, 2), "useful_tflop_per_sample": round(useful / 1e12, 2),
                "samples_per_second": p["samples_per_second"], "mfu": round(useful * p["samples_per_second"] / (RATE_TFLOPS * 1e12), 3),
                "mfu_as_printed_in_the_run": p["mfu"]})
print(json.dumps(out, indent=1))
