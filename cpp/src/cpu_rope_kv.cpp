// CPU backend: the same units as the CUDA kernel, run in order per token.
#include <vector>

#include "launchers.h"
#include "dispatch.h"

namespace ropekv {

void rope_kv_cpu(const RopeKVParams& p, DType input, DType cache) {
  if (p.num_tokens == 0) return;
  const bool wide = use_wide_path(p, input, cache);
  dispatch_rope_kv(input, cache, p.neox, wide, [&](auto t, auto c, auto n, auto w) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    constexpr bool NEOX = decltype(n)::value;
    constexpr bool WIDE = decltype(w)::value;
    constexpr int W = chunk_elems<T, NEOX, WIDE>();
    const UnitLayout L = make_layout<T, NEOX, WIDE>(p);
    // Decoded once per call, as each GPU thread decodes its unit once.
    std::vector<Unit> units(L.total);
    for (int u = 0; u < L.total; ++u) units[u] = decode_unit<T, C>(p, L, u, W);
    const int64_t num_tokens = p.num_tokens;
    // Threads only pay off once there is real work to split.
#pragma omp parallel for schedule(static) if (num_tokens * L.total > (1 << 12))
    for (int64_t tok = 0; tok < num_tokens; ++tok) {
      for (const Unit& unit : units) run_unit<T, C, NEOX, WIDE>(p, unit, tok);
    }
  });
}

}  // namespace ropekv
