// The CUDA backend's LayerNorm-LSTM kernels, compiled by the host compiler
// for the CPU emulation (csrc/cuda/simt_emulation.h).
#include "../../csrc/cuda/layer_norm_forward_step.cu"
#include "../../csrc/cuda/layer_norm_backward_step.cu"
