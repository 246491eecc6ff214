// mpt_kernels._C: the pybind11 module of the CUDA backend.
//
// It does not link against libtorch: Python (mpt_kernels/backends/cuda.py) validates
// the tensors and passes their addresses (tensor.data_ptr()), sizes and strides in
// elements, dtype codes, the device index and the current stream's cudaStream_t. The
// CUDA runtime is linked statically. A CUDA failure raises RuntimeError with CUDA's
// text; a malformed call raises ValueError.
//
// The host_* functions run the kernels' shared math (loss_math.cuh) on CPU buffers, so
// that it is tested without a GPU (tests/test_cuda_host_math.py).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "host_math.h"
#include "launchers.h"

namespace py = pybind11;
using namespace mpt;

namespace {

template <typename T>
T* address(uintptr_t value) {
  return reinterpret_cast<T*>(value);
}

py::dict codes(std::initializer_list<std::pair<const char*, int>> items) {
  py::dict d;
  for (const auto& item : items) d[item.first] = item.second;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of mpt_kernels (softmax family and multi-label losses); see csrc/.";

  m.attr("DTYPES") = codes({{"float32", kFloat32}, {"float16", kFloat16}, {"bfloat16", kBFloat16},
                            {"uint8", kUInt8}, {"bool", kUInt8}, {"float64", kFloat64}});
  m.attr("REDUCTIONS") = codes({{"none", kReduceNone}, {"sum", kReduceSum}, {"mean", kReduceMean}});
  m.attr("FOCUS") = codes({{"all", kFocusAll}, {"ref_correct", kFocusRefCorrect}, {"neg_flip", kFocusNegFlip},
                           {"student_wrong", kFocusStudentWrong}});
  m.attr("UPSTREAM_MODES") =
      codes({{"scalar", kUpstreamScalar}, {"per_row", kUpstreamPerRow}, {"per_element", kUpstreamPerElement}});
  m.attr("MULTILABEL_MAX_BLOCKS") = kMultilabelMaxBlocks;
  m.attr("CACHED_ROW_LIMIT") = kCachedRowLimit;

  py::class_<SoftmaxRowParams>(m, "SoftmaxRowParams", "The normalised options of one softmax-family loss.")
      .def(py::init([]() { return SoftmaxRowParams{}; }))
      .def_readwrite("num_classes", &SoftmaxRowParams::num_classes)
      .def_readwrite("num_old_classes", &SoftmaxRowParams::num_old_classes)
      .def_readwrite("has_ce", &SoftmaxRowParams::has_ce)
      .def_readwrite("has_old", &SoftmaxRowParams::has_old)
      .def_readwrite("has_new", &SoftmaxRowParams::has_new)
      .def_readwrite("kl", &SoftmaxRowParams::kl)
      .def_readwrite("focus", &SoftmaxRowParams::focus)
      .def_readwrite("ce_weight", &SoftmaxRowParams::ce_weight)
      .def_readwrite("old_weight", &SoftmaxRowParams::old_weight)
      .def_readwrite("new_weight", &SoftmaxRowParams::new_weight)
      .def_readwrite("label_smoothing", &SoftmaxRowParams::label_smoothing)
      .def_readwrite("new_class_bias", &SoftmaxRowParams::new_class_bias)
      .def_readwrite("inv_tau", &SoftmaxRowParams::inv_tau)
      .def_readwrite("kl_scale", &SoftmaxRowParams::kl_scale)
      .def_readwrite("alpha", &SoftmaxRowParams::alpha)
      .def_readwrite("beta", &SoftmaxRowParams::beta);

  py::class_<MultilabelParams>(m, "MultilabelParams", "The options of one Hill or SPLC loss.")
      .def(py::init([]() { return MultilabelParams{}; }))
      .def_readwrite("splc", &MultilabelParams::splc)
      .def_readwrite("lamb", &MultilabelParams::lamb)
      .def_readwrite("margin", &MultilabelParams::margin)
      .def_readwrite("gamma", &MultilabelParams::gamma)
      .def_readwrite("tau", &MultilabelParams::tau)
      .def_readwrite("correct_negatives", &MultilabelParams::correct_negatives);

  // ------------------------------------------------------------------------- CUDA entry points
  m.def(
      "softmax_forward",
      [](const SoftmaxRowParams& row, int dtype, int64_t num_rows, uintptr_t logits, int64_t logits_row_stride,
         uintptr_t old_logits, int64_t old_row_stride, uintptr_t new_logits, int64_t new_row_stride,
         uintptr_t class_bias, uintptr_t target, int64_t target_stride, bool target_is_int64,
         bool has_ignore_index, int64_t ignore_index, int reduction, uintptr_t row_loss, uintptr_t counted_rows,
         uintptr_t loss, uintptr_t grad, int device, uintptr_t stream) {
        SoftmaxForwardArgs a{row,         dtype,          num_rows,       logits,        logits_row_stride,
                             old_logits,  old_row_stride, new_logits,     new_row_stride, class_bias,
                             target,      target_stride,  target_is_int64, has_ignore_index, ignore_index,
                             reduction,   row_loss,       counted_rows,   loss,          grad};
        softmax_forward(a, Launch{device, stream});
      },
      py::kw_only(), py::arg("row"), py::arg("dtype"), py::arg("num_rows"), py::arg("logits"),
      py::arg("logits_row_stride"), py::arg("old_logits"), py::arg("old_row_stride"), py::arg("new_logits"),
      py::arg("new_row_stride"), py::arg("class_bias"), py::arg("target"), py::arg("target_stride"),
      py::arg("target_is_int64"), py::arg("has_ignore_index"), py::arg("ignore_index"), py::arg("reduction"),
      py::arg("row_loss"), py::arg("counted_rows"), py::arg("loss"), py::arg("grad"), py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Softmax-family loss (and, when grad != 0, its gradient for an upstream gradient of 1).");

  m.def(
      "multilabel_forward",
      [](const MultilabelParams& math, int dtype, int target_dtype, int64_t num_rows, int64_t num_cols,
         uintptr_t logits, int64_t logits_row_stride, uintptr_t targets, int64_t targets_row_stride, int reduction,
         float grad_scale, uintptr_t partials, uintptr_t loss, uintptr_t grad, int device, uintptr_t stream) {
        MultilabelForwardArgs a{math,   dtype,      target_dtype, num_rows,           num_cols,
                                logits, logits_row_stride,       targets, targets_row_stride, reduction,
                                grad_scale, partials, loss,       grad};
        multilabel_forward(a, Launch{device, stream});
      },
      py::kw_only(), py::arg("math"), py::arg("dtype"), py::arg("target_dtype"), py::arg("num_rows"),
      py::arg("num_cols"), py::arg("logits"), py::arg("logits_row_stride"), py::arg("targets"),
      py::arg("targets_row_stride"), py::arg("reduction"), py::arg("grad_scale"), py::arg("partials"),
      py::arg("loss"), py::arg("grad"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "Hill or SPLC loss (and, when grad != 0, its gradient for an upstream gradient of grad_scale).");

  m.def(
      "scale_gradient",
      [](int dtype, int64_t num_rows, int64_t num_cols, uintptr_t grad, uintptr_t upstream, int mode,
         int64_t upstream_stride0, int64_t upstream_stride1, uintptr_t target, int64_t target_stride,
         bool target_is_int64, bool has_ignore_index, int64_t ignore_index, int device, uintptr_t stream) {
        ScaleGradientArgs a{dtype,           num_rows,         num_cols, grad,          upstream,
                            mode,            upstream_stride0, upstream_stride1, target, target_stride,
                            target_is_int64, has_ignore_index, ignore_index};
        scale_gradient(a, Launch{device, stream});
      },
      py::kw_only(), py::arg("dtype"), py::arg("num_rows"), py::arg("num_cols"), py::arg("grad"),
      py::arg("upstream"), py::arg("mode"), py::arg("upstream_stride0"), py::arg("upstream_stride1"),
      py::arg("target"), py::arg("target_stride"), py::arg("target_is_int64"), py::arg("has_ignore_index"),
      py::arg("ignore_index"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      "grad *= upstream in place (scalar, per row or per element); nothing is written where it is 1, "
      "nor in rows whose target (when given) is ignored or out of range.");

  m.def("cuda_runtime_version", &cuda_runtime_version, "Version of the CUDA runtime linked into _C (e.g. 13000).");
  m.def("cuda_driver_version", &cuda_driver_version,
        "CUDA version the installed driver supports (e.g. 13000), 0 without a driver.");

  // ------------------------------------------------------------------------- host math (CPU buffers)
  m.def(
      "host_log_sigmoid",
      [](uintptr_t x, uintptr_t out, int64_t n) { host::log_sigmoid(address<const float>(x), address<float>(out), n); },
      py::arg("x"), py::arg("out"), py::arg("n"));
  m.def(
      "host_sigmoid",
      [](uintptr_t x, uintptr_t out, int64_t n) { host::sigmoid(address<const float>(x), address<float>(out), n); },
      py::arg("x"), py::arg("out"), py::arg("n"));
  m.def(
      "host_logsumexp",
      [](uintptr_t values, int64_t n, int lanes, int slot) {
        return host::logsumexp(address<const float>(values), n, lanes, slot);
      },
      py::arg("values"), py::arg("n"), py::arg("lanes"), py::arg("slot"));
  m.def(
      "host_argmax",
      [](uintptr_t values, int64_t n, int lanes, int slot) {
        return host::argmax(address<const float>(values), n, lanes, slot);
      },
      py::arg("values"), py::arg("n"), py::arg("lanes"), py::arg("slot"));
  m.def(
      "host_multilabel",
      [](const MultilabelParams& math, uintptr_t x, uintptr_t positive, int64_t n, uintptr_t loss, uintptr_t grad) {
        host::multilabel(math, address<const float>(x), address<const uint8_t>(positive), n, address<float>(loss),
                         address<float>(grad));
      },
      py::arg("math"), py::arg("x"), py::arg("positive"), py::arg("n"), py::arg("loss"), py::arg("grad"));
  m.def(
      "host_softmax_rows",
      [](const SoftmaxRowParams& row, int64_t num_rows, uintptr_t logits, uintptr_t old_logits, uintptr_t new_logits,
         uintptr_t class_bias, uintptr_t target, bool has_ignore_index, int64_t ignore_index, int lanes, int slot,
         uintptr_t loss, uintptr_t grad) {
        host::softmax_rows(row, num_rows, address<const float>(logits), address<const float>(old_logits),
                           address<const float>(new_logits), address<const float>(class_bias),
                           address<const int64_t>(target), has_ignore_index, ignore_index, lanes, slot,
                           address<float>(loss), address<float>(grad));
      },
      py::kw_only(), py::arg("row"), py::arg("num_rows"), py::arg("logits"), py::arg("old_logits"),
      py::arg("new_logits"), py::arg("class_bias"), py::arg("target"), py::arg("has_ignore_index"),
      py::arg("ignore_index"), py::arg("lanes"), py::arg("slot"), py::arg("loss"), py::arg("grad"));
}
