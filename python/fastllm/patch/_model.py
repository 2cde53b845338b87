"""Model inspection the patch layer shares: transformers on demand, the model's device and
float dtype, its text config, and config reads that survive per-layer configs."""
import torch


def import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("fastllm.patch needs transformers: pip install 'fastllm[hf]' "
                          f"(or pip install transformers) ({e})") from None
    return transformers


def model_info(model):
    """(device, dtype) of the model's first floating-point parameter (cpu / float32 if none)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def cfg_get(cfg, attr, default):
    """getattr that survives per-layer configs (Gemma 4): transformers raises a RuntimeError
    (AmbiguousGlobalPerLayerAttributeError) for a global read of a per-layer attribute."""
    try:
        return getattr(cfg, attr, default)
    except RuntimeError:
        return default
