"""`import fastllm` never fails because the extension, Triton or a GPU is missing."""
import subprocess
import sys
import textwrap


def _run(code):
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_without_extension():
    out = _run("""
        import sys, torch
        sys.modules["fastllm._C"] = None          # import of the extension now raises ImportError
        import fastllm
        from fastllm import _ext
        print(_ext.unavailable_reason())
        q, s = fastllm.ops.quantize_per_token(torch.randn(2, 3))
        x = torch.randn(2, 3)
        print(fastllm.ops.OPS["quantize_per_token"].reasons(x.device, x)["cuda"])
    """)
    assert "fastllm._C" in out


def test_import_without_triton():
    out = _run("""
        import sys, torch
        sys.modules["triton"] = None
        import fastllm
        x = torch.randn(2, 3)
        print(fastllm.ops.OPS["quantize_per_token"].reasons(x.device, x)["triton"])
        try:
            fastllm.ops.quantize_per_token(x, backend="triton")
        except fastllm.BackendUnavailableError as e:
            print("raised:", e)
    """)
    assert "Triton is not importable" in out and "raised:" in out
