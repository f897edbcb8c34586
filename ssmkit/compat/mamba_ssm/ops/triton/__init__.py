"""``mamba_ssm.ops.triton`` on ssmkit's kernels (Triton on CUDA, chunked PyTorch elsewhere)."""
