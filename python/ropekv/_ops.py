"""The operations as torch custom ops in the ``ropekv`` namespace.

``torch.ops.ropekv.store_kv`` and ``torch.ops.ropekv.rope`` declare exactly the
arguments they mutate and have fake (meta) implementations, so eager mode,
``torch.compile`` (no graph break; functionalized like any in-place op) and CUDA
graphs all see the same opaque operation. The public functions validate in
Python first (``_validate``: errors name the caller's arguments and nothing has
run yet), then call these ops.

The ops take the caller's tensors as they are, not the views the kernels want:
torch.library requires a mutating op to receive the tensors it mutates, so the
implementation re-derives the views (``_validate.views``, cheap, no checks) and
hands the Plan to the backend ``_backend`` chooses for the device. They are
registered for every device type; the backend choice covers CPU, CUDA and the
torch fallback elsewhere.

Calling ``torch.ops.ropekv.*`` directly skips validation; use the public API.
"""

from typing import Any, Optional, Tuple

import torch

from . import _backend
from . import _validate as V
from ._validate import Plan

# define/impl rather than torch.library.custom_op: the same op to torch.compile and
# opcheck, but dispatched without custom_op's Python autograd and version-counter
# layers (about 3 instead of 40 microseconds a call in eager mode).
_lib = torch.library.Library("ropekv", "DEF")
_lib.define(
    "store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor loc, "
    "Tensor? k_scale, Tensor? v_scale, float k_scale_value, float v_scale_value, "
    "int head_size, int v_head_size, bool enable_pdl) -> ()"
)
_lib.define(
    "rope(Tensor positions, Tensor(a!)? query, Tensor(b!) key, Tensor cos_sin_cache, int head_size, "
    "bool is_neox, Tensor? value, Tensor(c!)? k_cache, Tensor(d!)? v_cache, Tensor? loc, "
    "Tensor? k_scale, Tensor? v_scale, float k_scale_value, float v_scale_value, "
    "int v_head_size, bool enable_pdl) -> ()"
)


def _run(plan: Plan) -> None:
    if plan.num_tokens == 0:
        return
    _backend.backend_for(plan.k.device)(plan)


def _store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    loc: torch.Tensor,
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
    k_scale_value: float,
    v_scale_value: float,
    head_size: int,
    v_head_size: int,
    enable_pdl: bool,
) -> None:
    """SPEC.md section 2 on validated arguments; head_size / v_head_size are D and Dv."""
    _run(V.views(k, head_size, v=v, v_head_size=v_head_size, k_cache=k_cache, v_cache=v_cache, loc=loc,
                 k_scale=k_scale, k_scale_value=k_scale_value, v_scale=v_scale, v_scale_value=v_scale_value,
                 enable_pdl=enable_pdl))


def _rope(
    positions: torch.Tensor,
    query: Optional[torch.Tensor],
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox: bool,
    value: Optional[torch.Tensor],
    k_cache: Optional[torch.Tensor],
    v_cache: Optional[torch.Tensor],
    loc: Optional[torch.Tensor],
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
    k_scale_value: float,
    v_scale_value: float,
    v_head_size: int,
    enable_pdl: bool,
) -> None:
    """SPEC.md section 3 on validated arguments: RoPE on query (optional) and key,
    and the KV write of store_kv when value is given."""
    _run(V.views(key, head_size, q=query, positions=positions, cos_sin=cos_sin_cache, neox=is_neox,
                 v=value, v_head_size=v_head_size, k_cache=k_cache, v_cache=v_cache, loc=loc,
                 k_scale=k_scale, k_scale_value=k_scale_value, v_scale=v_scale, v_scale_value=v_scale_value,
                 enable_pdl=enable_pdl))


def _nothing(*args: Any) -> None:
    """The fake (meta) implementation: both ops write their arguments in place and return nothing."""
    return None


# CompositeExplicitAutograd: one implementation for every device (the backend choice
# covers them); autograd and version counters are torch's C++ fallbacks.
_lib.impl("store_kv", _store_kv, "CompositeExplicitAutograd")
_lib.impl("rope", _rope, "CompositeExplicitAutograd")
torch.library.register_fake("ropekv::store_kv", _nothing, lib=_lib)
torch.library.register_fake("ropekv::rope", _nothing, lib=_lib)


def call_of(plan: Plan) -> Tuple[Any, Tuple[Any, ...]]:
    """(op, arguments) that execute a validated plan (from plan_store_kv / plan_rope)."""
    given = plan.given
    head_size = int(plan.k.shape[2])
    v_head_size = int(plan.v.shape[2]) if plan.v is not None else 0
    if plan.rot_dim == 0:
        return torch.ops.ropekv.store_kv.default, (
            given["k"], given["v"], given["k_cache"], given["v_cache"], plan.loc,
            plan.k_scale, plan.v_scale, plan.k_scale_value, plan.v_scale_value,
            head_size, v_head_size, plan.enable_pdl,
        )
    return torch.ops.ropekv.rope.default, (
        plan.positions, given.get("q"), given["k"], plan.cos_sin, head_size, plan.neox,
        given.get("v"), given.get("k_cache"), given.get("v_cache"), plan.loc,
        plan.k_scale, plan.v_scale, plan.k_scale_value, plan.v_scale_value,
        v_head_size, plan.enable_pdl,
    )


def run(plan: Plan) -> None:
    """Executes a validated plan through its op."""
    op, args = call_of(plan)
    op(*args)
