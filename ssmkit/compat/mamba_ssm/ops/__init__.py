"""``mamba_ssm.ops`` on ssmkit's kernels."""
