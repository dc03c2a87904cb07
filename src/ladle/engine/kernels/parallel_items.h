// The one way the kernels split work across threads (defined in decode_attention.cpp).
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace ladle_kernels {

// fn(first, last) over [0, num_items) in chunks on torch's intra-op thread pool, or inline
// when `work` (about the multiply-adds) is too small to pay for waking the other threads.
void parallel_items(int64_t num_items, int64_t work,
                    c10::function_ref<void(int64_t, int64_t)> fn);

}  // namespace ladle_kernels
