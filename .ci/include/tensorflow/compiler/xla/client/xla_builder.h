// Forwarding header for building Horovod 0.28.1 against TensorFlow >= 2.18.
//
// Horovod's xla_mpi_ops.cc includes the pre-2.18 path of XlaBuilder; the TF
// wheel now ships it only as xla/hlo/builder/xla_builder.h. XLA also dropped
// the xla::StatusOr alias that Horovod's GPU code still names.
#ifndef TFLLM_COMPAT_TENSORFLOW_COMPILER_XLA_CLIENT_XLA_BUILDER_H_
#define TFLLM_COMPAT_TENSORFLOW_COMPILER_XLA_CLIENT_XLA_BUILDER_H_

#include "xla/hlo/builder/xla_builder.h"
#include "absl/status/statusor.h"

namespace xla {
template <typename T>
using StatusOr = absl::StatusOr<T>;
}  // namespace xla

#endif  // TFLLM_COMPAT_TENSORFLOW_COMPILER_XLA_CLIENT_XLA_BUILDER_H_
