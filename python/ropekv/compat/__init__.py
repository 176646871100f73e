"""Drop-in replacements for other kernel libraries' entry points, backed by ropekv.

- :mod:`ropekv.compat.sgl_kernel`: sgl-kernel's ``apply_rope_with_cos_sin_cache_inplace``,
  ``FusedSetKVBufferArg`` and ``set_kv_buffer_kernel``.
- :mod:`ropekv.compat.vllm`: vLLM's ``reshape_and_cache_flash`` and ``rotary_embedding``
  (``vllm._custom_ops``).

Each keeps the original's names, argument order, defaults and tensor layouts, so
that swapping the import is the whole change; every call is validated and runs
like the rest of ropekv (SPEC.md).
"""

from . import sgl_kernel, vllm

__all__ = ["sgl_kernel", "vllm"]
