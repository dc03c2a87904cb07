// The kernels' C++ entry points, for kernels that are built from the others (decoder_layer.cpp).
// Each is also a `torch.ops.ladle_kernels` operator; `native.py` documents their contracts.
#pragma once

#include <ATen/core/Tensor.h>

namespace ladle_kernels {

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales);
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& w);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& x);

}  // namespace ladle_kernels
