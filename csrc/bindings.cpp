// The pyfastrl._cuda module: one pybind11 binding per kernel launcher. Pointers and the stream are
// plain integers (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream); the Python wrappers
// own allocation, checks and autograd. C++ exceptions reach Python as ValueError (bad argument)
// or RuntimeError (CUDA error).
#include <pybind11/pybind11.h>

#include "attention_merge/merge.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pyfastrl CUDA kernels (raw device pointers; see kernels/prefix_attention/merge_cuda.py)";
  m.def("attention_merge", &pyfastrl::attention_merge::merge,
        "Merge cross-attention partial results into rows of out/lse in place (merge.h).");
  m.def("attention_merge_add_rows", &pyfastrl::attention_merge::add_rows,
        "dq[q_rows] += cross_dq, dk[k_rows] += cross_dk, dv[k_rows] += cross_dv in one launch (merge.h).");
}
