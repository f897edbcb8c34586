"""``mamba_ssm.ops.triton.selective_state_update``: one decode step, state updated in place."""

import functools

from ssmkit.ops.state_update import selective_state_update

selective_state_update_ref = functools.partial(selective_state_update, backend="reference")

__all__ = ["selective_state_update", "selective_state_update_ref"]
