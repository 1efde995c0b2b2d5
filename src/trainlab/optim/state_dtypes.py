"""Put optimizer buffers back in the dtypes they were kept in, after torch's load_state_dict.

torch casts every floating state tensor to its parameter's dtype on load, which turns bf16 momentum
into fp32: twice the memory, different arithmetic, and a resumed run that no longer matches one
never stopped.  The values are taken again from the saved tensors, so nothing is rounded twice."""

from __future__ import annotations

from typing import Callable

import torch


def restore_buffer_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict,
                          dtypes_for: Callable[[torch.Tensor, dict], dict[str, torch.dtype]]) -> None:
    # torch matches saved and current parameters by position across the groups; so do we
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, p in zip(saved_ids, params):
        saved_state = state_dict["state"].get(idx)
        if not saved_state:
            continue
        for key, dtype in dtypes_for(p, saved_state).items():
            if key in saved_state:
                # copy: never share storage with the caller's dict (it may be another optimizer's
                # live state_dict())
                optimizer.state[p][key] = saved_state[key].to(device=p.device, dtype=dtype, copy=True)
