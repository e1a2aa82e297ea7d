// Argument checks shared by every host function. The Python layer (fastdistil/ops/_common.py and the op files)
// validates user input first with clear ValueErrors; these are the backstop for direct callers
// of the private ops.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

#define FD_CHECK_2D(x) TORCH_CHECK((x).dim() == 2, #x " must be 2-D (N, V), got shape ", (x).sizes())
#define FD_CHECK_SAME_SHAPE(a, b) \
  TORCH_CHECK((a).sizes() == (b).sizes(), #a " and " #b " must have the same shape, got ", (a).sizes(), " and ", (b).sizes())
#define FD_CHECK_SAME_DTYPE(a, b) \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #a " and " #b " must have the same dtype, got ", \
              (a).scalar_type(), " and ", (b).scalar_type())
#define FD_CHECK_FLOATING(x) \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()), #x " must be a floating-point tensor, got ", (x).scalar_type())

namespace fastdistil {

// The student/teacher pair every loss kernel takes: 2-D, same shape, same floating dtype.
inline void check_student_teacher(const at::Tensor& student, const at::Tensor& teacher) {
  FD_CHECK_2D(student);
  FD_CHECK_SAME_SHAPE(student, teacher);
  FD_CHECK_SAME_DTYPE(student, teacher);
  FD_CHECK_FLOATING(student);
}

// Optional per-row bool mask of length n, made contiguous; undefined when absent.
inline at::Tensor checked_row_mask(const std::optional<at::Tensor>& row_mask, int64_t n) {
  if (!row_mask.has_value() || !row_mask->defined()) return at::Tensor();
  TORCH_CHECK(row_mask->scalar_type() == at::kBool, "row_mask must be bool, got ", row_mask->scalar_type());
  TORCH_CHECK(row_mask->dim() == 1 && row_mask->size(0) == n, "row_mask must have shape (", n, "), got ",
              row_mask->sizes());
  return row_mask->contiguous();
}

// The distillation-head epilogue's arguments (csrc/cpu/distill_head.cpp, csrc/cuda/distill_head.cu): the
// student chunk is overwritten in place, so it must be contiguous and of a dtype the kernels write; labels are
// optional int64, one per row. Returns the labels made contiguous (undefined when absent).
inline at::Tensor checked_epilogue_args(const at::Tensor& student, const at::Tensor& teacher,
                                        const std::optional<at::Tensor>& labels, double temperature) {
  check_student_teacher(student, teacher);
  TORCH_CHECK(student.is_contiguous(), "student_logits must be contiguous (it is overwritten in place)");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be finite and > 0, got ", temperature);
  const auto dtype = student.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "the native epilogue takes float32, bfloat16 or float16 logits, got ", dtype);
  if (!labels.has_value() || !labels->defined()) return at::Tensor();
  const int64_t n = student.size(0);
  TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == n,
              "labels must be int64 of shape (", n, "), got ", labels->scalar_type(), " ", labels->sizes());
  return labels->contiguous();
}

// Every tensor argument of the epilogue on the logits' device: a CUDA kernel handed a host pointer (a CPU scalar
// coefficient, say) would read host memory and bring the process down; the CPU kernel would read device memory.
inline void check_epilogue_devices(const at::Tensor& student, const at::Tensor& teacher,
                                   const std::optional<at::Tensor>& kl_rows, const std::optional<at::Tensor>& labels,
                                   const at::Tensor& kl_coef, const at::Tensor& mlm_coef) {
  const auto device = student.device();
  const auto same = [&](const at::Tensor& x, const char* name) {
    TORCH_CHECK(x.device() == device, name, " is on ", x.device(), " but student_logits is on ", device,
                ": every tensor argument of the epilogue must be on the logits' device");
  };
  same(teacher, "teacher_logits");
  if (kl_rows.has_value() && kl_rows->defined()) same(*kl_rows, "kl_rows");
  if (labels.has_value() && labels->defined()) same(*labels, "labels");
  same(kl_coef, "kl_coef");
  same(mlm_coef, "mlm_coef");
}

}  // namespace fastdistil
