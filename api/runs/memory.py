"""GPU memory of a run at its spec's own settings: the peak PyTorch allocates, training or
evaluating, as the trainer does it (trainer/model.py, trainer/loss.py, trainer/plan.py).

- Weights. NF4 quantizes the decoder's linear layers (4 bits plus ~0.127 bits of
  double-quantized block constants); the output head and the vision tower are kept out of it
  (trainer.model.NF4_SKIP), so is the projector (trained in full), and bitsandbytes leaves
  anything that is not an nn.Linear alone (a mixture of experts' 3-D expert weights). peft's
  prepare_model_for_kbit_training then casts every weight that is not 4-bit to fp32: 4 bytes
  each. `none` keeps all in bf16.
- Trained parameters (LoRA, and the copy of the projector peft's modules_to_save trains): fp32
  weight, gradient and AdamW's two moments, 16 bytes.
- Activations, per token and decoder layer, without checkpointing: a linear function of the
  layer's widths fitted to the H200 measurements below. Full checkpointing keeps each layer's
  input (the residual stream: fp32 under NF4, since the fp32 embeddings start it, else bf16)
  and recomputes one layer at a time; `selective` checkpoints every other layer.
- The output head. The loss reads the logits at the answer tokens only (trainer.loss), a few per
  example; but under NF4 the head's weight is fp32 and autocast makes a bf16 copy of it for the
  matmul that the backward pass keeps: vocabulary x hidden x 2 bytes, 1.3-2.6 GiB for Gemma.
- Evaluation: the weights, the optimizer's state (it lives until the run ends), the prompt's KV
  cache for an evaluation batch and the prefill's largest transient. Label scoring's continuation
  pass sizes its chunks to 40% of the free memory (trainer/scoring.py), so it fits any card by
  construction and is not counted; on a large GPU it makes the run's peak higher than this.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.runs.model_archs import Arch
from trainer.contract.spec import RunSpec

GIB = 1024**3
NF4_BYTES = 4.127 / 8
# The instruction with its label list around the image, the turn markers and the answer, by
# data set: ten digit names; 37 pet breeds (about 230 tokens with Gemma's tokenizer); an image
# folder's labels are unknown here, counted like the pets.
PROMPT_TOKENS = {"digits": 80, "oxford-iiit-pet": 240, "imagefolder": 240}
# Tokens of one answer: the label's and the end-of-turn marker.
ANSWER_TOKENS = {"digits": 3, "oxford-iiit-pet": 8, "imagefolder": 8}
# Bytes kept for the backward pass per token and decoder layer without checkpointing, as
# ACT_HIDDEN x hidden + ACT_MLP x (intermediate + the experts' per token) + ACT_ATTENTION x
# (query + key + value widths). ACT_HIDDEN is set, not fitted: the fp32 residual stream (4 bytes)
# kept at a layer's (up to) four norms. The other two are a least-squares fit (relative error)
# to the three training peaks measured with NF4, no checkpointing and micro-batch 8 on the H200:
# Gemma 3 4B 40.83 GiB (bench/results/gpu_trainer_plan/gpu_trainer.json, profile "auto"),
# Qwen2.5-VL-7B 51.52 GiB and Gemma 4 (31B widths, 6 layers) 35.12 GiB
# (bench/results/gpu_families/after-plan/gpu_families-*.json); with the overhead below, the
# totals are 2-11% above them. Gemma 4's wide attention (32 heads of 256-512 on 5376) is what
# the large attention factor carries: its q/k norms and rotary embeddings keep fp32 copies.
ACT_HIDDEN = 16.0
ACT_MLP = 6.8
ACT_ATTENTION = 46.0
# bf16 weights: a bf16 residual stream, so fewer fp32 copies. No bf16 training peak has been
# measured alone; the bound is the whole run's peak of Gemma 3 4B at micro-batch 16 without
# checkpointing, 66.3 GiB (bench/results/gpu_trainer_plan, "auto-bf16"; the training peak is at
# most that), which the NF4 factors overshoot by 26%. This scale puts the estimate at the bound.
BF16_ACTIVATIONS = 0.8
# Per logit at the answer tokens: bf16 logits, their fp32 copy, the saved log-softmax and its
# fp32 and bf16 gradients; a final soft-cap keeps two more bf16 intermediates.
LOGIT_BYTES = 16
SOFTCAP_BYTES = 4
# Not in PyTorch's allocated count but on the card: the CUDA context and cuBLAS workspaces
# (~0.5 GiB on the H200 with torch 2.11), and the caching allocator's fragmentation, which a card
# that fills up cannot fully give back.
CONTEXT_BYTES = 0.5 * GIB
FRAGMENTATION = 0.04


@dataclass(frozen=True)
class Plan:
    """The step the estimate is for: the spec's explicit values, else what the trainer falls
    back to (batch_size per forward; full checkpointing where allowed)."""

    micro: int
    checkpointing: str  # none | selective | full
    quantization: str  # nf4 | none


@dataclass(frozen=True)
class Memory:
    """Bytes."""

    weights: float
    adapters: float
    activations: float
    head: float  # the head's bf16 copy and the answer logits
    training: float  # the training step's peak
    evaluation: float  # the evaluation's peak
    overhead: float

    @property
    def total(self) -> float:
        return max(self.training, self.evaluation) + self.overhead


def plans(spec: RunSpec) -> list[Plan]:
    """The plan(s) the spec allows at its own settings: `auto` quantization is either."""
    micro = spec.batch_size if spec.micro_batch_size == "auto" else spec.micro_batch_size
    mode = spec.checkpointing
    if mode == "auto":
        mode = "full" if spec.gradient_checkpointing else "none"
    quants = ["nf4", "none"] if spec.quantization == "auto" else [spec.quantization]
    return [Plan(micro, mode, q) for q in quants]


def sequence_length(spec: RunSpec, arch: Arch) -> int:
    """Tokens per training example: batches are padded to their longest example, not to
    max_length, and an example is the image's tokens, the instruction with its label list and
    the answer. Without the image's count, max_length (an upper bound)."""
    if not arch.image_tokens:
        return spec.max_length
    return min(spec.max_length, arch.image_tokens + PROMPT_TOKENS[spec.data.kind])


def weights_bytes(arch: Arch, quantization: str) -> float:
    linear = arch.layers * arch.layer_params
    rest = arch.embed_params + arch.vision_params + arch.layers * arch.expert_params
    if quantization == "none":
        return float((linear + rest) * 2)
    return linear * NF4_BYTES + rest * 4


def lora_params(spec: RunSpec, arch: Arch) -> int:
    h, i = arch.hidden, arch.intermediate
    shapes = {
        "q_proj": (h, arch.q_dim),
        "k_proj": (h, arch.kv_dim),
        "v_proj": (h, arch.kv_dim),
        "o_proj": (arch.q_dim, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    # A module name this table does not know is counted as a square h x h projection;
    # `all-linear` is the seven projections of a decoder layer.
    names = list(shapes) if spec.lora_target_modules == ["all-linear"] else spec.lora_target_modules
    per_layer = sum(sum(shapes.get(m, (h, h))) for m in names) * spec.lora_r
    return per_layer * arch.layers


def layer_activation_bytes(arch: Arch) -> float:
    """Per token, one decoder layer without checkpointing."""
    mlp = arch.intermediate + arch.expert_intermediate
    return ACT_HIDDEN * arch.hidden + ACT_MLP * mlp + ACT_ATTENTION * (arch.q_dim + 2 * arch.kv_dim)


def memory(spec: RunSpec, arch: Arch, plan: Plan) -> Memory:
    m, t, layers = plan.micro, sequence_length(spec, arch), arch.layers
    nf4 = plan.quantization == "nf4"
    weights = weights_bytes(arch, plan.quantization)
    trainable = lora_params(spec, arch) + arch.projector_params
    adapters = trainable * 16.0
    layer = m * t * layer_activation_bytes(arch) * (1.0 if nf4 else BF16_ACTIVATIONS)
    resid = m * t * arch.hidden * (4 if nf4 else 2)
    full_layers = {"none": layers, "selective": layers // 2, "full": 0}[plan.checkpointing]
    activations = full_layers * layer + (layers - full_layers) * resid
    recompute = layer if full_layers < layers else 0.0
    logits = m * ANSWER_TOKENS[spec.data.kind] * arch.vocab
    logits *= LOGIT_BYTES + (SOFTCAP_BYTES if arch.softcap else 0)
    head_copy = arch.vocab * arch.hidden * 2.0 if nf4 else 0.0
    # The head's copy and the logits live from the forward's end to the head's backward; the
    # recomputation of a checkpointed layer comes after.
    training = weights + adapters + activations + max(head_copy + logits, recompute)
    evaluation = weights + trainable * 12.0 + _prefill_bytes(spec, arch, t, head_copy)
    peak = max(training, evaluation)
    return Memory(
        weights=weights,
        adapters=adapters,
        activations=activations,
        head=head_copy + logits,
        training=training,
        evaluation=evaluation,
        overhead=CONTEXT_BYTES + FRAGMENTATION * peak,
    )


def _prefill_bytes(spec: RunSpec, arch: Arch, tokens: int, head_copy: float) -> float:
    """One evaluation batch's prompt: its bf16 KV cache (with the generated tokens) and the
    larger of the head's bf16 copy and one layer's transient (no gradients: the fp32 residual in
    and out, the MLP's bf16 intermediates)."""
    e = spec.eval_batch_size
    new = spec.max_new_tokens if spec.eval_mode == "generate" else ANSWER_TOKENS[spec.data.kind]
    kv_cache = e * (tokens + new) * arch.layers * 2 * arch.kv_dim * 2.0
    mlp = arch.intermediate + arch.expert_intermediate
    transient = e * tokens * (8 * arch.hidden + 6 * mlp)
    return kv_cache + max(head_copy, transient) + e * arch.vocab * 8.0
