// BatchNorm (training statistics) and ReLU in one kernel, forward and backward, for bf16 channels_last
// activations on the CPU: the candidate fusion that benchmarks/fused_bn_relu.py measures against torch's own
// batch_norm + relu_. It is a measurement, not part of the trainer.
//
// Passes over the activations (each a read or write of the whole tensor): forward 3 (sums; normalise+ReLU),
// backward 7 (masked sums; dx), against about 13 for the separate ops. Sums are kept in fp32 for 64 rows, then
// added into double per thread, so a long batch loses nothing to its length; the one-pass variance
// E[x^2] - mean^2 still loses precision when |mean| is far larger than the spread (not so for activations
// straight out of a convolution, which is all this is measured on).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

using bf16 = at::BFloat16;

namespace {

constexpr int64_t kRowsPerFlush = 64;

// Per-channel sums of a and b over the rows of [rows, channels] layouts, where `add_row(m, a, b)` adds row m's
// terms into the fp32 accumulators a and b. The loop over channels stays inside add_row so it vectorises.
template <typename AddRow>
std::pair<std::vector<double>, std::vector<double>> channel_sums(int64_t rows, int64_t channels, AddRow add_row) {
  const int threads = at::get_num_threads();
  std::vector<double> first(threads * channels, 0.0), second(threads * channels, 0.0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    const int t = at::get_thread_num();
    std::vector<float> a(channels, 0.f), b(channels, 0.f);
    for (int64_t block = begin; block < end; block += kRowsPerFlush) {
      for (int64_t m = block; m < std::min(block + kRowsPerFlush, end); ++m) add_row(m, a.data(), b.data());
      for (int64_t c = 0; c < channels; ++c) {
        first[t * channels + c] += a[c];
        second[t * channels + c] += b[c];
        a[c] = b[c] = 0.f;
      }
    }
  });
  std::vector<double> a(channels, 0.0), b(channels, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int64_t c = 0; c < channels; ++c) {
      a[c] += first[t * channels + c];
      b[c] += second[t * channels + c];
    }
  return {a, b};
}

}  // namespace

// y = relu(batch_norm(x)) with the batch's statistics; updates the running statistics as nn.BatchNorm2d does with
// a momentum (the caller counts num_batches_tracked). NaN passes through ReLU, as in torch, so a diverged step
// is still seen.
std::vector<at::Tensor> forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                at::Tensor running_mean, at::Tensor running_var, double momentum, double eps) {
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 && input.dim() == 4 &&
              input.is_contiguous(at::MemoryFormat::ChannelsLast), "input: expected bf16 NCHW in channels_last");
  const int64_t channels = input.size(1), rows = input.numel() / channels;
  TORCH_CHECK(rows > 1, "input: expected more than one value per channel when training");
  const bf16* x = input.const_data_ptr<bf16>();
  auto [sum, square_sum] = channel_sums(rows, channels, [=](int64_t m, float* __restrict a, float* __restrict b) {
    const bf16* __restrict row = x + m * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const float v = static_cast<float>(row[c]);
      a[c] += v;
      b[c] += v * v;
    }
  });
  auto mean = at::empty({channels}, weight.options()), invstd = at::empty({channels}, weight.options());
  std::vector<float> scale(channels), shift(channels);
  float* mean_p = mean.data_ptr<float>();
  float* invstd_p = invstd.data_ptr<float>();
  float* running_mean_p = running_mean.data_ptr<float>();
  float* running_var_p = running_var.data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    const double mu = sum[c] / rows, var = std::max(square_sum[c] / rows - mu * mu, 0.0);
    mean_p[c] = mu;
    invstd_p[c] = 1.0 / std::sqrt(var + eps);
    running_mean_p[c] = (1 - momentum) * running_mean_p[c] + momentum * mu;
    running_var_p[c] = (1 - momentum) * running_var_p[c] + momentum * var * rows / (rows - 1);
    scale[c] = weight.const_data_ptr<float>()[c] * invstd_p[c];
    shift[c] = bias.const_data_ptr<float>()[c] - mean_p[c] * scale[c];
  }
  auto output = at::empty_like(input);
  bf16* y = output.data_ptr<bf16>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t c = 0; c < channels; ++c) {
        const float v = static_cast<float>(x[m * channels + c]) * scale[c] + shift[c];
        y[m * channels + c] = bf16(v <= 0.f ? 0.f : v);
      }
  });
  return {output, mean, invstd};
}

// Gradients of relu(batch_norm(x)) for the input, weight and bias; `output` (the forward's) gives ReLU's mask.
std::vector<at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& output,
                                 const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight) {
  const int64_t channels = input.size(1), rows = input.numel() / channels;
  const auto grad = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  const bf16* dy = grad.const_data_ptr<bf16>();
  const bf16* x = input.const_data_ptr<bf16>();
  const bf16* y = output.const_data_ptr<bf16>();
  const float* mean_p = mean.const_data_ptr<float>();
  const float* invstd_p = invstd.const_data_ptr<float>();
  const float* weight_p = weight.const_data_ptr<float>();
  // The incoming gradient where ReLU passed its input (y > 0, or NaN as torch's threshold_backward), zero elsewhere.
  auto masked = [](bf16 grad, bf16 out) { return static_cast<float>(out) <= 0.f ? 0.f : static_cast<float>(grad); };
  auto [grad_sum, grad_dot] = channel_sums(rows, channels, [=](int64_t m, float* __restrict a, float* __restrict b) {
    const int64_t row = m * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const float g = masked(dy[row + c], y[row + c]);
      a[c] += g;
      b[c] += g * (static_cast<float>(x[row + c]) - mean_p[c]);
    }
  });
  auto grad_weight = at::empty({channels}, weight.options()), grad_bias = at::empty({channels}, weight.options());
  std::vector<float> k_grad(channels), k_const(channels), k_centered(channels);
  for (int64_t c = 0; c < channels; ++c) {
    grad_bias.data_ptr<float>()[c] = grad_sum[c];
    grad_weight.data_ptr<float>()[c] = grad_dot[c] * invstd_p[c];
    // dx = k_grad * g - k_const - k_centered * (x - mean), g the ReLU-masked incoming gradient
    k_grad[c] = weight_p[c] * invstd_p[c];
    k_const[c] = k_grad[c] * grad_sum[c] / rows;
    k_centered[c] = k_grad[c] * invstd_p[c] * invstd_p[c] * grad_dot[c] / rows;
  }
  auto grad_input = at::empty_like(input);
  bf16* dx = grad_input.data_ptr<bf16>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t i = m * channels + c;
        dx[i] = bf16(k_grad[c] * masked(dy[i], y[i]) - k_const[c] -
                     k_centered[c] * (static_cast<float>(x[i]) - mean_p[c]));
      }
  });
  return {grad_input, grad_weight, grad_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
