"""Two messages of the trainer's libraries that say nothing true about a tuneplane run, filtered
by their exact text (everything else they log still shows).

- bitsandbytes, when imported on a CPU with AVX512-BF16, tries to fetch an optional fused 4-bit
  CPU kernel from the Hub's `kernels` package and logs "Failed to load CPU gemm_4bit_forward from
  kernels-community" when that package is missing. The trainer never quantizes on the CPU
  (trainer/model.py), so that kernel is never used, and installing `kernels` would download
  code from the Hub at run time.
- peft's PeftModel reads `model.is_gradient_checkpointing`, which transformers 5 deprecated in
  favour of `is_activation_checkpointing` with a FutureWarning on every model load; the caller
  is peft's code, not ours (trainer/constraints.txt pins both), so there is nothing to change here.
"""

from __future__ import annotations

import logging
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
GC_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_installed = False


def install() -> None:
    """Idempotent; call before bitsandbytes and peft are imported (they log at import/load)."""
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_DropMessage(BNB_KERNELS_MESSAGE))
    warnings.filterwarnings("ignore", message=GC_DEPRECATION, category=FutureWarning)
