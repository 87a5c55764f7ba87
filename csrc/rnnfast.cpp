// The rnnfast op library: every schema, declared once, and the Python module
// init of rnnfast._C (build information only; the ops are reached through
// torch.ops.rnnfast, see rnnfast/ops.py).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "backend_info.h"
#ifdef RNNFAST_WITH_CUDA
#include "cuda/launch_counts.h"
#endif

#ifndef RNNFAST_CUDA_ARCHS
#define RNNFAST_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(rnnfast, m) {
  // One LSTM layer in one direction over a whole time-major sequence.
  //   input        [T, B, I], or packed rows [N, I] with batch_sizes [T]
  //   hx, cx       [B, P], [B, H] initial states
  //   weight_ih    [4H, I], weight_hh [4H, P], biases [4H], weight_hr [P, H]
  //   batch_sizes  int64 CPU tensor [T] (PackedSequence), or None
  //   zoneout (Krueger et al. 2016), per state s in {hidden, cell}:
  //     s_t = a s_{t-1} + (1 - a) s~_t (h after the projection), where a is
  //     zoneout_<s>_mask (bool, the output's rows: [T, B, P] / [T, B, H] or
  //     [N, *]; training) or, without a mask, the rate zoneout_<s> in
  //     [0, 1) (evaluation's expectation). All absent: no zoneout.
  // Returns output ([T, B, P] or [N, P]), hy [B, P], cy [B, H], and what the
  // backward needs when training: the activated gates [N, 4H], the cell
  // states c~_t the outputs were computed from [N, H] and, with zoneout on
  // c, the carried (zoned-out) cell states [N, H] (in float for half
  // types), else empty tensors.
  m.def(
      "lstm_forward(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, "
      "Tensor? batch_sizes, bool reverse, bool training, "
      "Tensor? zoneout_hidden_mask=None, Tensor? zoneout_cell_mask=None, "
      "float zoneout_hidden=0., float zoneout_cell=0.) -> "
      "(Tensor output, Tensor hy, Tensor cy, Tensor gates, Tensor cells, "
      "Tensor cell_states)");
  // Gradients of lstm_forward. grad_bias is the gradient of each bias;
  // grad_weight_hr is empty without a projection. output_mask says which of
  // the seven outputs to compute (as ATen's _cudnn_rnn_backward): one not
  // asked for is an empty [0] tensor and its GEMM or reduction is skipped.
  // The zoneout arguments are the forward's; cell_states its output of that
  // name (needed with zoneout on c).
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_hy, Tensor grad_cy, "
      "Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? weight_hr, Tensor? batch_sizes, bool reverse, Tensor output, "
      "Tensor gates, Tensor cells, bool[7] output_mask=[True, True, True, "
      "True, True, True, True], Tensor? cell_states=None, "
      "Tensor? zoneout_hidden_mask=None, Tensor? zoneout_cell_mask=None, "
      "float zoneout_hidden=0., float zoneout_cell=0.) -> (Tensor grad_input, "
      "Tensor grad_hx, Tensor grad_cx, Tensor grad_weight_ih, "
      "Tensor grad_weight_hh, Tensor grad_bias, Tensor grad_weight_hr)");
  // One LayerNorm-LSTM layer (Ba et al. 2016, section 3.1) in one direction:
  //   gates = LN_ih(W_ih x) + LN_hh(W_hh h) + b_ih + b_hh, LN over 4H
  //   c = f c_prev + i g,  h = o tanh(LN_cell(c)), LN over H.
  // Sizes as lstm_forward (P = H); ln_ih_*, ln_hh_* [4H], ln_cell_* [H].
  // Returns output, hy, cy and, when training, the saved activations:
  // cells [N, H], normalized_ih and normalized_hh [N, 4H] (the LayerNorm
  // inputs after normalisation, from which the backward recomputes the
  // gates) and stats [N, 4] (1/std of W_ih x and W_hh h, mean and 1/std of
  // c~), and with zoneout (as lstm_forward's, h~ = o tanh(LN_cell(c~))) on
  // c the carried cell states [N, H], else empty tensors.
  m.def(
      "layer_norm_lstm_forward(Tensor input, Tensor hx, Tensor cx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
      "Tensor ln_ih_weight, Tensor ln_ih_bias, Tensor ln_hh_weight, "
      "Tensor ln_hh_bias, Tensor ln_cell_weight, Tensor ln_cell_bias, "
      "Tensor? batch_sizes, bool reverse, bool training, float eps, "
      "Tensor? zoneout_hidden_mask=None, Tensor? zoneout_cell_mask=None, "
      "float zoneout_hidden=0., float zoneout_cell=0.) -> "
      "(Tensor output, Tensor hy, Tensor cy, Tensor cells, "
      "Tensor normalized_ih, Tensor normalized_hh, Tensor stats, "
      "Tensor cell_states)");
  // Gradients of layer_norm_lstm_forward. grad_bias is the gradient of each
  // of bias_ih, bias_hh, ln_ih_bias and ln_hh_bias (they enter alike).
  // output_mask and the zoneout arguments as lstm_backward's, one flag for
  // each of the ten outputs.
  m.def(
      "layer_norm_lstm_backward(Tensor grad_output, Tensor grad_hy, "
      "Tensor grad_cy, Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, "
      "Tensor ln_ih_weight, Tensor ln_ih_bias, Tensor ln_hh_weight, "
      "Tensor ln_hh_bias, Tensor ln_cell_weight, Tensor ln_cell_bias, "
      "Tensor? batch_sizes, bool reverse, Tensor output, Tensor cells, "
      "Tensor normalized_ih, Tensor normalized_hh, Tensor stats, "
      "bool[10] output_mask=[True, True, True, True, True, True, True, True, "
      "True, True], Tensor? cell_states=None, "
      "Tensor? zoneout_hidden_mask=None, Tensor? zoneout_cell_mask=None, "
      "float zoneout_hidden=0., float zoneout_cell=0.) -> "
      "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, "
      "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_ln_ih_weight, Tensor grad_ln_hh_weight, "
      "Tensor grad_ln_cell_weight, Tensor grad_ln_cell_bias)");
  // A stacked network's forward for inference: num_layers layers of
  // lstm_forward (or, with layer_norm, layer_norm_lstm_forward), both
  // directions of a layer concatenated along the features, as
  // torch._VF.lstm composes them without dropout. h0, c0 [layers *
  // directions, B, *]; weights as nn.LSTM's _flat_weights (each layer, then
  // direction: weight_ih, weight_hh[, bias_ih, bias_hh], then weight_hr or
  // the six LayerNorm parameters in layer_norm_lstm_forward's order).
  // Returns output (batch_first as given), h_n, c_n. Nothing is saved and
  // no mask drawn; not differentiable (refused while grad mode is on and an
  // argument requires grad). stack.cpp.
  m.def(
      "stacked_inference(Tensor input, Tensor h0, Tensor c0, Tensor[] weights, "
      "int num_layers, bool bidirectional, bool batch_first, "
      "Tensor? batch_sizes, bool has_biases, bool layer_norm, float eps=1e-05, "
      "float zoneout_hidden=0., float zoneout_cell=0.) -> (Tensor output, "
      "Tensor h_n, Tensor c_n)");
}

namespace {
// Binds rnnfast::CpuStepProduct<T> (backend_info.h) as `name`.
template <typename T>
void bind_step_product(pybind11::module& m, const char* name, const char* doc) {
  using Product = rnnfast::CpuStepProduct<T>;
  pybind11::class_<Product>(m, name, doc)
      .def(pybind11::init<const std::string&, int64_t, int64_t, int64_t,
                          intptr_t, int64_t, bool>())
      .def("multiply", &Product::multiply,
           "multiply(m, a, lda, beta, c, ldc): C = A op(B) + beta C.")
      .def_property_readonly("path", &Product::path)
      .def_property_readonly("threaded", &Product::threaded);
}
}  // namespace

// The torch this library was compiled against, as a marker string that
// rnnfast/_torch_version.py finds in the file when the library fails to load
// under another torch (undefined symbols), so that the error can name both.
#define RNNFAST_BUILT_AGAINST_MARKER "rnnfast-built-against-torch="
constexpr char kBuiltAgainst[] = RNNFAST_BUILT_AGAINST_MARKER RNNFAST_TORCH_VERSION;
// The version alone (what follows the marker).
constexpr const char* built_against_torch() {
  return kBuiltAgainst + sizeof(RNNFAST_BUILT_AGAINST_MARKER) - 1;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "rnnfast's compiled ops (registered in torch.ops.rnnfast).";
  // Read at import (rnnfast/ops.py) without build_info(), which asks the CPU
  // and the environment things an import need not.
  m.attr("built_against_torch") = std::string(built_against_torch());
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
#ifdef RNNFAST_WITH_CUDA
        info["with_cuda"] = true;
#else
        info["with_cuda"] = false;
#endif
        info["cuda_archs"] = std::string(RNNFAST_CUDA_ARCHS);
        info["torch_version"] = std::string(built_against_torch());
        info["cpu_kernels"] = std::string(rnnfast::cpu_kernels_in_use());
        info["cpu_gemm"] = std::string(rnnfast::cpu_gemm_in_use());
        info["cpu_native_bfloat16"] = rnnfast::cpu_native_bfloat16();
        info["cpu_bf16_step_gemm"] = std::string(rnnfast::cpu_bf16_step_gemm());
        info["cpu_int8_kernels"] = std::string(rnnfast::cpu_int8_kernels_in_use());
        {
          const auto bulk = rnnfast::cpu_bulk_gemm_choice();
          pybind11::dict d;
          d["chosen"] = bulk.chosen != nullptr ? pybind11::object(pybind11::str(bulk.chosen))
                                               : pybind11::object(pybind11::none());
          d["blas_us"] = bulk.blas_us;
          d["onednn_us"] = bulk.onednn_us;
          d["why"] = std::string(bulk.why);
          info["cpu_bulk_gemm"] = d;
        }
        info["cpu_step_gemm_kernels"] =
            std::string(rnnfast::cpu_step_gemm_kernels());
        pybind11::list choices;
        for (const auto& c : rnnfast::cpu_step_gemm_choices()) {
          pybind11::dict d;
          d["m"] = c.m;
          d["n"] = c.n;
          d["k"] = c.k;
          d["threaded"] = c.threaded;
          d["chosen"] = std::string(c.chosen);
          d["blas_us"] = c.blas_us;
          d["rnnfast_us"] = c.rnnfast_us;
          choices.append(d);
        }
        info["cpu_step_gemm"] = choices;
        pybind11::dict teams;  // {threads: time loops that held such a team}
        const std::vector<int64_t> runs = rnnfast::cpu_step_team_runs();
        for (size_t size = 0; size < runs.size(); ++size) {
          if (runs[size] > 0) teams[pybind11::int_(size)] = runs[size];
        }
        info["cpu_step_teams"] = teams;
        pybind11::dict groups;  // {groups: time loops run in so many groups}
        const std::vector<int64_t> group_runs = rnnfast::cpu_row_group_runs();
        for (size_t n = 0; n < group_runs.size(); ++n) {
          if (group_runs[n] > 0) groups[pybind11::int_(n)] = group_runs[n];
        }
        info["cpu_row_groups"] = groups;
        info["cpu_one_use_products"] = rnnfast::cpu_one_use_products();
        // {blocks per cluster: LayerNorm row_groups launches so far} (1: no
        // cluster); empty until a CUDA LayerNorm-LSTM has run.
        pybind11::dict clusters;
#ifdef RNNFAST_WITH_CUDA
        const std::vector<int64_t> launches =
            rnnfast::cuda::row_groups_launches();
        for (size_t n = 0; n < launches.size(); ++n) {
          if (launches[n] > 0) clusters[pybind11::int_(n)] = launches[n];
        }
#endif
        info["cuda_row_group_clusters"] = clusters;
        return info;
      },
      "How this rnnfast extension was built, and the CPU kernels in use.");
  bind_step_product<float>(
      m, "_StepProduct",
      "The CPU time loop's per-step product on one float32 weight, packed "
      "(tests and the benchmark's gemm floor; raw addresses, the caller "
      "keeps the weight alive): _StepProduct(path, max_rows, n, k, b, ldb, "
      "trans_b) with path 'auto', 'blas' or 'rnnfast'.");
  bind_step_product<c10::BFloat16>(
      m, "_Bf16StepProduct",
      "The CPU time loop's per-step product on one bfloat16 weight (tests; "
      "raw addresses of bfloat16 A and B and float32 C, the caller keeps "
      "the weight alive): _Bf16StepProduct(path, max_rows, n, k, b, ldb, "
      "trans_b) with path 'auto' or 'blas'.");
  m.def("_one_use_product", &rnnfast::cpu_multiply_once,
        "The CPU product of a float32 weight used once, read in its stored "
        "layout (tests and the benchmark's gemm floor; raw addresses): "
        "_one_use_product(path, m, n, k, a, lda, b, ldb, bias, beta, c, ldc) "
        "computes C = A B^T (+ bias) + beta C for B [n, k] row-major and "
        "bias 0 or the address of n floats, path 'auto', 'blas' or "
        "'rnnfast'; returns what ran.");
  m.def("_one_use_bf16_product", &rnnfast::cpu_multiply_once_bf16,
        "_one_use_product for bfloat16 A and B (raw addresses of their "
        "bits) and float32 C, without bias: _one_use_bf16_product(path, m, "
        "n, k, a, lda, b, ldb, beta, c, ldc); returns what ran.");
  m.def("_op_conversion", &rnnfast::cpu_op_conversion,
        "The conversion a CPU op applies to what it reads in another dtype "
        "(tests; raw addresses): _op_conversion(src, from, dst, to, n) with "
        "dtypes 'float32', 'bfloat16' or 'float16'; returns whether the "
        "op's own loop for small tensors ran.");
  m.def("empty_cache", &rnnfast::release_cpu_buffer_cache,
        "Frees the CPU blocks rnnfast keeps for reuse; returns their bytes.");
  m.def("cache_bytes", &rnnfast::cpu_buffer_cache_bytes,
        "Bytes of free CPU blocks rnnfast keeps for reuse.");
}
