"""`python -m fastllm.demo` explains a token mismatch as rounding only within a stated bound,
and rejects bad arguments before any work (in-process, the small CPU model, 2 tokens)."""
import functools

import pytest
import torch

from fastllm import demo

SMALL = ["--device", "cpu", "--tokens", "2", "--batch", "2", "--prompt-len", "8"]


@pytest.fixture
def one_timed_run(monkeypatch):
    """Speed is not the point here: one timed generate instead of the best of two."""
    monkeypatch.setattr(demo, "timed_generate", functools.partial(demo.timed_generate, repeats=1))


@pytest.mark.parametrize("argv, msg", [
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--batch", "-1"], "--batch must be >= 1"),
    (["--skip-attention", "5"], "--skip-attention 5: must be between 0 and the small model's 4 layers"),
    (["--device", "tpu"], "--device tpu"),
])
def test_bad_args_are_usage_errors(capsys, monkeypatch, argv, msg):
    monkeypatch.setattr(demo, "build_model", lambda *a: pytest.fail("work started before the checks"))
    with pytest.raises(SystemExit) as e:
        demo.main(["--device", "cpu", *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err


def test_wrong_kernel_is_not_called_rounding(capsys, monkeypatch, one_timed_run):
    from fastllm.patch import _attention
    of, od = _attention.flash_attention, _attention.decode_attention
    monkeypatch.setattr(_attention, "flash_attention", lambda *a, **k: of(*a, **k) * 1.5)
    monkeypatch.setattr(_attention, "decode_attention", lambda *a, **k: od(*a, **k) * 1.5)
    assert demo.main(SMALL) == 1
    text = capsys.readouterr().out
    assert "near-tie" not in text and "differ beyond float32 rounding" in text


def test_decode_only_bug_is_caught_by_step_logits(capsys, monkeypatch, one_timed_run):
    # Prompt logits exact, every generated step wrong: the step check must see it.
    from fastllm.patch import _attention

    def wrap(f):
        return lambda q, *a, **k: f(q, *a, **k) * (1.5 if q.shape[2] <= 16 and q.shape[2] < a[0].shape[2] else 1.0)
    monkeypatch.setattr(_attention, "flash_attention", wrap(_attention.flash_attention))
    monkeypatch.setattr(_attention, "decode_attention", wrap(_attention.decode_attention))
    assert demo.main(SMALL) == 1
    text = capsys.readouterr().out
    assert "logits of generated steps 0..1" in text and "ERROR" in text and "near-tie" not in text
