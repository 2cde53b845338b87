"""`python -m fastllm.bench {attention,decode,int8,sparse24,quantize,model,all}`: kernels vs
peers with TFLOP/s or GB/s and fraction of the device's measured peak. See __main__.py for the
CLI; timing.py for how times are taken; suites/ for what each benchmark measures."""


def parse_device(ap, text, expected):
    """--device TEXT as a torch.device, or ap.error (before any work) when it is malformed, not
    cpu / cuda, or CUDA on a machine without it. Shared by the bench and the demo CLIs."""
    import torch
    try:
        dev = torch.device(text)
    except RuntimeError:      # torch's message lists every device type it knows
        ap.error(f"--device {text}: expected {expected}")
    if dev.type not in ("cpu", "cuda"):
        ap.error(f"--device {text}: expected {expected}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        ap.error(f"--device {text}: no CUDA device ({why})")
    return dev
