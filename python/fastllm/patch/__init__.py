"""fastllm.patch: the thin, reversible layer that swaps fastllm's kernels into a transformers
model instance (no class in transformers is modified).

    model = fastllm.patch(model)          # attention -> fastllm.ops.flash_attention
    model = fastllm.patch(model, quantize="w8a8")   # + nn.Linear -> fastllm.nn.Int8Linear (lossy)
    print(fastllm.patch_report(model))    # what was replaced / skipped, backend per op, why
    fastllm.unpatch(model)                # the original model again (bit-identical state_dict)
    fastllm.save_pretrained(model, d); model = fastllm.from_pretrained(d)

transformers is imported only when these are called (it is an optional extra).
Modules: core.py (patch / unpatch / patch_report), saving.py (save_pretrained /
from_pretrained), _options.py (argument checks), _configs.py (private config copies),
_skip.py (skip_attention), _entries.py (the report's backend per op), _model.py (model
inspection helpers), _attention.py (the AttentionInterface function and the prefill / decode
routing), rules.py (what is replaced, as data), _linear.py (linear swaps: selection,
calibration, SmoothQuant folding, commit / undo), _serialize.py (the checkpoint format of
swapped models), _save_guard.py (model.save_pretrained refused while layers are swapped),
report.py (PatchReport).
"""
from ..errors import CheckpointFormatError, OriginalsDiscardedError, UnsupportedModelError
from .core import PatchState, is_patched, patch, patch_report, unpatch
from .saving import from_pretrained, save_pretrained
from .report import PatchReport
from .rules import RULES, Rule

__all__ = ["patch", "unpatch", "patch_report", "save_pretrained", "from_pretrained", "is_patched",
           "PatchReport", "PatchState", "UnsupportedModelError", "OriginalsDiscardedError", "CheckpointFormatError",
           "RULES", "Rule"]
