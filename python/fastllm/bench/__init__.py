"""`python -m fastllm.bench {attention,decode,int8,sparse24,quantize,model,all}`: kernels vs
peers with TFLOP/s or GB/s and fraction of the device's measured peak. See __main__.py for the
CLI; timing.py for how times are taken; suites/ for what each benchmark measures."""
