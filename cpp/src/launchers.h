// Entry points of the compiled backends. The bindings call these; they take
// already-validated parameters (see python/ropekv/_validate.py).
#pragma once

#include <cstdint>

#include "ropekv/rope_kv.h"

namespace ropekv {

// Runs the operation on the CPU, in parallel over tokens when OpenMP is there.
void rope_kv_cpu(const RopeKVParams& p, DType input, DType cache);

#if defined(ROPEKV_WITH_CUDA)
// Enqueues the operation on `stream` of `device`: one kernel launch, no host
// synchronization, no allocation. enable_pdl launches it with programmatic
// dependent launch (sm_90+), so it can overlap the previous kernel's tail.
void rope_kv_cuda(const RopeKVParams& p, DType input, DType cache, int device, uintptr_t stream,
                  bool enable_pdl);
#endif

}  // namespace ropekv
