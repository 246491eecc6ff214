// mpt_kernels._C: the pybind11 module of the CUDA backend.
//
// It does not link against libtorch: Python (mpt_kernels/backends/cuda.py) validates
// the tensors and passes their addresses (tensor.data_ptr()), sizes and strides in
// elements, dtype codes, the device index and the current stream's cudaStream_t; what
// a family's forward and backward both read travels as one SoftmaxInputs or
// MultilabelInputs record. The CUDA runtime is linked statically. A CUDA failure raises
// RuntimeError with CUDA's text; a malformed call raises ValueError.
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
  // Its classes are local to this module (py::module_local): tests load a second build of
  // these bindings, the CUDA emulation (tests/cuda_emulation), next to this one.
  m.doc() = "CUDA kernels of mpt_kernels (softmax family and multi-label losses); see csrc/.";

  m.attr("DTYPES") = codes({{"float32", kFloat32}, {"float16", kFloat16}, {"bfloat16", kBFloat16},
                            {"uint8", kUInt8}, {"bool", kUInt8}, {"float64", kFloat64}});
  m.attr("REDUCTIONS") = codes({{"none", kReduceNone}, {"sum", kReduceSum}, {"mean", kReduceMean}});
  m.attr("FOCUS") = codes({{"all", kFocusAll}, {"ref_correct", kFocusRefCorrect}, {"neg_flip", kFocusNegFlip},
                           {"student_wrong", kFocusStudentWrong}});
  m.attr("MULTILABEL_MAX_BLOCKS") = kMultilabelMaxBlocks;
  m.attr("ROW_THREADS") = kMaxRowThreads;
  m.attr("SLOTS_PER_THREAD") = kSlotsPerThread;
  m.attr("SOFTMAX_STAT_FLOATS") = kSoftmaxStatFloats;

  py::class_<SoftmaxRowParams>(m, "SoftmaxRowParams", "The normalised options of one softmax-family loss.", py::module_local())
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

  py::class_<MultilabelParams>(m, "MultilabelParams", "The options of one Hill or SPLC loss.", py::module_local())
      .def(py::init([]() { return MultilabelParams{}; }))
      .def_readwrite("splc", &MultilabelParams::splc)
      .def_readwrite("lamb", &MultilabelParams::lamb)
      .def_readwrite("margin", &MultilabelParams::margin)
      .def_readwrite("gamma", &MultilabelParams::gamma)
      .def_readwrite("flip_logit", &MultilabelParams::flip_logit);

  py::class_<SoftmaxInputs>(m, "SoftmaxInputs", "What a softmax-family loss's forward and backward read.", py::module_local())
      .def(py::init([]() { return SoftmaxInputs{}; }))
      .def_readwrite("row", &SoftmaxInputs::row)
      .def_readwrite("dtype", &SoftmaxInputs::dtype)
      .def_readwrite("num_rows", &SoftmaxInputs::num_rows)
      .def_readwrite("logits", &SoftmaxInputs::logits)
      .def_readwrite("logits_row_stride", &SoftmaxInputs::logits_row_stride)
      .def_readwrite("old_logits", &SoftmaxInputs::old_logits)
      .def_readwrite("old_row_stride", &SoftmaxInputs::old_row_stride)
      .def_readwrite("new_logits", &SoftmaxInputs::new_logits)
      .def_readwrite("new_row_stride", &SoftmaxInputs::new_row_stride)
      .def_readwrite("class_bias", &SoftmaxInputs::class_bias)
      .def_readwrite("target", &SoftmaxInputs::target)
      .def_readwrite("target_stride", &SoftmaxInputs::target_stride)
      .def_readwrite("target_is_int64", &SoftmaxInputs::target_is_int64)
      .def_readwrite("has_ignore_index", &SoftmaxInputs::has_ignore_index)
      .def_readwrite("ignore_index", &SoftmaxInputs::ignore_index);

  py::class_<MultilabelInputs>(m, "MultilabelInputs", "What a Hill or SPLC loss's forward and backward read.", py::module_local())
      .def(py::init([]() { return MultilabelInputs{}; }))
      .def_readwrite("math", &MultilabelInputs::math)
      .def_readwrite("dtype", &MultilabelInputs::dtype)
      .def_readwrite("target_dtype", &MultilabelInputs::target_dtype)
      .def_readwrite("num_rows", &MultilabelInputs::num_rows)
      .def_readwrite("num_cols", &MultilabelInputs::num_cols)
      .def_readwrite("logits", &MultilabelInputs::logits)
      .def_readwrite("logits_row_stride", &MultilabelInputs::logits_row_stride)
      .def_readwrite("targets", &MultilabelInputs::targets)
      .def_readwrite("targets_row_stride", &MultilabelInputs::targets_row_stride)
      .def_readwrite("grad_scale", &MultilabelInputs::grad_scale);

  // ------------------------------------------------------------------------- CUDA entry points
  m.def(
      "softmax_forward",
      [](const SoftmaxInputs& inputs, int reduction, uintptr_t row_loss, uintptr_t counted_rows, uintptr_t loss,
         uintptr_t grad, uintptr_t stats, int64_t shared_row_bytes, int device, uintptr_t stream) {
        softmax_forward(
            SoftmaxForwardArgs{inputs, reduction, row_loss, counted_rows, loss, grad, stats, shared_row_bytes},
            Launch{device, stream});
      },
      py::kw_only(), py::arg("inputs"), py::arg("reduction"), py::arg("row_loss"), py::arg("counted_rows"),
      py::arg("loss"), py::arg("grad"), py::arg("stats"), py::arg("shared_row_bytes") = -1, py::arg("device"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Softmax-family loss; when grad != 0, also its gradient for an upstream gradient of 1 and the rows' stats. "
      "shared_row_bytes: the most shared memory a row may keep its chunks in between the two sweeps "
      "(-1: the device's limit; 0: none, a long row is read twice).");

  m.def(
      "softmax_forward_plan",
      [](const SoftmaxInputs& inputs, bool with_grad, int64_t shared_row_bytes, int device) {
        const SoftmaxRowPlan plan = softmax_forward_plan(inputs, with_grad, shared_row_bytes, Launch{device, 0});
        py::dict out;
        out["threads"] = plan.threads;
        out["chunks"] = plan.chunks;
        out["staged_chunks"] = plan.staged_chunks;
        out["shared_bytes"] = plan.shared_bytes;
        return out;
      },
      py::kw_only(), py::arg("inputs"), py::arg("with_grad"), py::arg("shared_row_bytes") = -1, py::arg("device"),
      "How softmax_forward runs each row: threads per block, chunks, the chunks kept in shared memory between the "
      "sweeps, and the dynamic shared memory per block.");

  m.def(
      "softmax_backward",
      [](const SoftmaxInputs& inputs, uintptr_t stats, uintptr_t upstream, int64_t upstream_stride, uintptr_t grad,
         int device, uintptr_t stream) {
        softmax_backward(SoftmaxBackwardArgs{inputs, stats, upstream, upstream_stride, grad}, Launch{device, stream});
      },
      py::kw_only(), py::arg("inputs"), py::arg("stats"), py::arg("upstream"), py::arg("upstream_stride"),
      py::arg("grad"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Recomputes, times the upstream gradient, the rows of grad whose upstream gradient is not 1 and whose "
      "target is counted; the other rows keep the forward's gradient.");

  m.def(
      "multilabel_forward",
      [](const MultilabelInputs& inputs, int reduction, uintptr_t partials, uintptr_t loss, uintptr_t grad,
         int device, uintptr_t stream) {
        multilabel_forward(MultilabelForwardArgs{inputs, reduction, partials, loss, grad}, Launch{device, stream});
      },
      py::kw_only(), py::arg("inputs"), py::arg("reduction"), py::arg("partials"), py::arg("loss"), py::arg("grad"),
      py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Hill or SPLC loss; when grad != 0, also its gradient for an upstream gradient of 1 (times grad_scale).");

  m.def(
      "multilabel_backward",
      [](const MultilabelInputs& inputs, uintptr_t upstream, int64_t upstream_stride0, int64_t upstream_stride1,
         uintptr_t grad, int device, uintptr_t stream) {
        multilabel_backward(MultilabelBackwardArgs{inputs, upstream, upstream_stride0, upstream_stride1, grad},
                            Launch{device, stream});
      },
      py::kw_only(), py::arg("inputs"), py::arg("upstream"), py::arg("upstream_stride0"), py::arg("upstream_stride1"),
      py::arg("grad"), py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Recomputes, times the upstream gradient, the elements of grad whose upstream gradient is not 1.");

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
      "host_multilabel",
      [](const MultilabelParams& math, uintptr_t x, uintptr_t positive, int64_t n, float scale, uintptr_t loss,
         uintptr_t grad) {
        host::multilabel(math, address<const float>(x), address<const uint8_t>(positive), n, scale,
                         address<float>(loss), address<float>(grad));
      },
      py::kw_only(), py::arg("math"), py::arg("x"), py::arg("positive"), py::arg("n"), py::arg("scale"),
      py::arg("loss"), py::arg("grad"));
  m.def(
      "host_multilabel_backward",
      [](const MultilabelParams& math, uintptr_t x, uintptr_t positive, int64_t n, float scale, uintptr_t upstream,
         uintptr_t grad) {
        host::multilabel_backward(math, address<const float>(x), address<const uint8_t>(positive), n, scale,
                                  address<const float>(upstream), address<float>(grad));
      },
      py::kw_only(), py::arg("math"), py::arg("x"), py::arg("positive"), py::arg("n"), py::arg("scale"),
      py::arg("upstream"), py::arg("grad"));
  m.def(
      "host_softmax_rows",
      [](const SoftmaxRowParams& row, int64_t num_rows, uintptr_t logits, uintptr_t old_logits, uintptr_t new_logits,
         uintptr_t class_bias, uintptr_t target, bool has_ignore_index, int64_t ignore_index, bool mean, int lanes,
         int slot, int rounds, uintptr_t loss, uintptr_t grad, uintptr_t stats) {
        host::softmax_rows(row, num_rows, address<const float>(logits), address<const float>(old_logits),
                           address<const float>(new_logits), address<const float>(class_bias),
                           address<const int64_t>(target), has_ignore_index, ignore_index, mean, lanes, slot,
                           rounds, address<float>(loss), address<float>(grad), address<float>(stats));
      },
      py::kw_only(), py::arg("row"), py::arg("num_rows"), py::arg("logits"), py::arg("old_logits"),
      py::arg("new_logits"), py::arg("class_bias"), py::arg("target"), py::arg("has_ignore_index"),
      py::arg("ignore_index"), py::arg("mean"), py::arg("lanes"), py::arg("slot"), py::arg("rounds"), py::arg("loss"),
      py::arg("grad"), py::arg("stats"));
  m.def(
      "host_softmax_rows_backward",
      [](const SoftmaxRowParams& row, int64_t num_rows, uintptr_t logits, uintptr_t old_logits, uintptr_t new_logits,
         uintptr_t class_bias, uintptr_t target, bool has_ignore_index, int64_t ignore_index, uintptr_t stats,
         uintptr_t upstream, int64_t upstream_stride, int lanes, int slot, int rounds, uintptr_t grad) {
        host::softmax_rows_backward(row, num_rows, address<const float>(logits), address<const float>(old_logits),
                                    address<const float>(new_logits), address<const float>(class_bias),
                                    address<const int64_t>(target), has_ignore_index, ignore_index,
                                    address<const float>(stats), address<const float>(upstream), upstream_stride,
                                    lanes, slot, rounds, address<float>(grad));
      },
      py::kw_only(), py::arg("row"), py::arg("num_rows"), py::arg("logits"), py::arg("old_logits"),
      py::arg("new_logits"), py::arg("class_bias"), py::arg("target"), py::arg("has_ignore_index"),
      py::arg("ignore_index"), py::arg("stats"), py::arg("upstream"), py::arg("upstream_stride"), py::arg("lanes"),
      py::arg("slot"), py::arg("rounds"), py::arg("grad"));
}
