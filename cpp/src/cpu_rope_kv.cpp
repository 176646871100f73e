// CPU backend: the same units as the CUDA kernel, run in order per token.
#include <vector>

#include "launchers.h"
#include "dispatch.h"

namespace ropekv {

void rope_kv_cpu(const RopeKVParams& p, DType input, DType cache) {
  if (p.num_tokens == 0) return;
  const bool wide = use_wide_path(p, input, cache);
  dispatch_rope_kv(input, cache, p.neox, wide, p.rot_dim > 0, [&](auto t, auto c, auto n, auto w, auto r) {
    using T = typename decltype(t)::type;
    using C = typename decltype(c)::type;
    constexpr bool NEOX = decltype(n)::value;
    constexpr bool WIDE = decltype(w)::value;
    constexpr bool ROT = decltype(r)::value;
    const UnitLayout L = make_layout<T, NEOX, WIDE>(p);
    // Planned once per call, as each GPU thread plans its unit once.
    std::vector<UnitPlan<T, C>> plans(L.total);
    for (int u = 0; u < L.total; ++u) {
      plans[u] = plan_unit<T, C, NEOX, WIDE, ROT>(p, L, u);
      read_plan_scale(plans[u]);
    }
    const int64_t num_tokens = p.num_tokens;
    // Threads only pay off once there is real work to split.
#pragma omp parallel for schedule(static) if (num_tokens * L.total > (1 << 12))
    for (int64_t tok = 0; tok < num_tokens; ++tok) {
      for (const UnitPlan<T, C>& plan : plans) {
        const TokenIndex ix = load_token_index(p, ROT && plan.rotate, plan.cache != nullptr, tok);
        run_plan<T, C, NEOX, WIDE, ROT>(p, plan, tok, ix);
      }
    }
  });
}

}  // namespace ropekv
