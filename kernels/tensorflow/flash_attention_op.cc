/*
 * TensorFlow custom-op library: TfjsFlashAttention and TfjsFlashAttentionGrad
 * on the GPU device, written against TensorFlow's C API only (see
 * tf_c_api.h) and calling kernels/cuda's C ABI. Loaded into tfjs-node-gpu's
 * libtensorflow with TF_LoadLibrary (loader.cc); the registrations below run
 * as the library's static initialiser, which TF_LoadLibrary wraps.
 *
 * Which stream the kernels run on
 * -------------------------------
 * A C-API kernel cannot get TensorFlow's CUDA stream: TF_GetStream serves
 * pluggable devices only and fails for the built-in GPU device ("Accessing
 * device stream is only supported for pluggable devices",
 * tensorflow/c/kernels.cc). Instead the kernels are launched on the CUDA
 * legacy default stream (cudaStreamLegacy, named explicitly so that a
 * --default-stream per-thread build cannot change it). TensorFlow's GPU
 * device creates its compute and copy streams with
 * GpuDriver::CreateStream -> cuStreamCreate(stream, 0) (flags 0 = blocking;
 * tensorflow/stream_executor/cuda/cuda_driver.cc, whose TODO asks whether
 * they could be made CU_STREAM_NON_BLOCKING: they are not). Work on the
 * legacy stream waits for all work issued before it to blocking streams of
 * the context, and work issued later to a blocking stream waits for it.
 * So our launches start after the ops that produced the inputs, and every
 * later op, copy to the host, or reuse of a freed buffer by TensorFlow's
 * allocator waits for our kernels: the same order as on TensorFlow's own
 * stream, with no host synchronisation. The price is that our kernels
 * serialise with all of TensorFlow's streams on that device, which an
 * attention op (a large kernel between dependent ops) barely notices. Both
 * use the device's primary context (TensorFlow's GpuContext retains it; the
 * CUDA runtime uses it), and fa_use_device_of selects the device that holds
 * the inputs.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <string>

#include "../cuda/flash_attention.h"
#include "tf_c_api.h"

namespace {

const char* const kForwardOp = "TfjsFlashAttention";
const char* const kBackwardOp = "TfjsFlashAttentionGrad";

struct Attrs {
  float softmax_scale, softcap, dropout_rate;
  int64_t window_left, window_right, seed_lo, seed_hi;
};

const char* const kAttrSpecs[] = {
    "softmax_scale: float", "window_left: int", "window_right: int", "softcap: float",
    "dropout_rate: float",  "seed_lo: int",     "seed_hi: int",
};

/* Frees what it holds at scope exit. */
struct Scope {
  TF_Status* status = TF_NewStatus();
  TF_Tensor* tensors[16] = {};
  int count = 0;
  ~Scope() {
    for (int i = 0; i < count; ++i) {
      if (tensors[i] != nullptr) TF_DeleteTensor(tensors[i]);
    }
    TF_DeleteStatus(status);
  }
  TF_Tensor* keep(TF_Tensor* t) {
    tensors[count++] = t;
    return t;
  }
};

void fail(TF_OpKernelContext* ctx, TF_Code code, const std::string& message) {
  TF_Status* status = TF_NewStatus();
  TF_SetStatus(status, code, message.c_str());
  TF_OpKernelContext_Failure(ctx, status);
  TF_DeleteStatus(status);
}

std::string shape_string(const TF_Tensor* t) {
  std::string s = "[";
  for (int i = 0; i < TF_NumDims(t); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(TF_Dim(t, i));
  }
  return s + "]";
}

void* create_kernel(TF_OpKernelConstruction* ctx) {
  Attrs* attrs = new Attrs();
  TF_Status* status = TF_NewStatus();
  TF_OpKernelConstruction_GetAttrFloat(ctx, "softmax_scale", &attrs->softmax_scale, status);
  if (TF_GetCode(status) == TF_OK)
    TF_OpKernelConstruction_GetAttrInt64(ctx, "window_left", &attrs->window_left, status);
  if (TF_GetCode(status) == TF_OK)
    TF_OpKernelConstruction_GetAttrInt64(ctx, "window_right", &attrs->window_right, status);
  if (TF_GetCode(status) == TF_OK)
    TF_OpKernelConstruction_GetAttrFloat(ctx, "softcap", &attrs->softcap, status);
  if (TF_GetCode(status) == TF_OK)
    TF_OpKernelConstruction_GetAttrFloat(ctx, "dropout_rate", &attrs->dropout_rate, status);
  if (TF_GetCode(status) == TF_OK)
    TF_OpKernelConstruction_GetAttrInt64(ctx, "seed_lo", &attrs->seed_lo, status);
  if (TF_GetCode(status) == TF_OK)
    TF_OpKernelConstruction_GetAttrInt64(ctx, "seed_hi", &attrs->seed_hi, status);
  if (TF_GetCode(status) != TF_OK) TF_OpKernelConstruction_Failure(ctx, status);
  TF_DeleteStatus(status);
  return attrs;
}

void delete_kernel(void* kernel) { delete static_cast<Attrs*>(kernel); }

/* Reads input `index` (named `name`), float32 of `rank` dims (-1: 1 or 2). */
TF_Tensor* get_input(TF_OpKernelContext* ctx, Scope& scope, int index, const char* name,
                     int rank) {
  TF_Tensor* t = nullptr;
  TF_GetInput(ctx, index, &t, scope.status);
  if (TF_GetCode(scope.status) != TF_OK) {
    TF_OpKernelContext_Failure(ctx, scope.status);
    return nullptr;
  }
  scope.keep(t);
  if (TF_TensorType(t) != TF_FLOAT) {
    fail(ctx, TF_INVALID_ARGUMENT,
         std::string(name) + " must be float32, got dtype " + std::to_string(TF_TensorType(t)));
    return nullptr;
  }
  const int dims = TF_NumDims(t);
  if (rank >= 0 ? dims != rank : (dims != 1 && dims != 2)) {
    fail(ctx, TF_INVALID_ARGUMENT,
         std::string(name) + " must have rank " + (rank >= 0 ? std::to_string(rank) : "1 or 2") +
             ", got shape " + shape_string(t));
    return nullptr;
  }
  return t;
}

bool expect_shape(TF_OpKernelContext* ctx, const TF_Tensor* t, const char* name,
                  std::initializer_list<int64_t> dims) {
  bool ok = TF_NumDims(t) == static_cast<int>(dims.size());
  int i = 0;
  for (int64_t d : dims) ok = ok && TF_Dim(t, i++) == d;
  if (ok) return true;
  std::string want = "[";
  i = 0;
  for (int64_t d : dims) want += (i++ ? ", " : "") + std::to_string(d);
  fail(ctx, TF_INVALID_ARGUMENT,
       std::string(name) + " must have shape " + want + "], got " + shape_string(t));
  return false;
}

/* Fills p from q, k, v, slopes and the attributes; false after a failure. */
bool make_params(TF_OpKernelContext* ctx, const Attrs& a, const TF_Tensor* q, const TF_Tensor* k,
                 const TF_Tensor* v, const TF_Tensor* slopes, fa_params* p) {
  memset(p, 0, sizeof(*p));
  p->batch = static_cast<int>(TF_Dim(q, 0));
  p->seq_q = static_cast<int>(TF_Dim(q, 1));
  p->heads = static_cast<int>(TF_Dim(q, 2));
  p->head_dim = static_cast<int>(TF_Dim(q, 3));
  p->seq_k = static_cast<int>(TF_Dim(k, 1));
  p->heads_kv = static_cast<int>(TF_Dim(k, 2));
  p->head_dim_v = static_cast<int>(TF_Dim(v, 3));
  if (!expect_shape(ctx, k, "k", {p->batch, p->seq_k, p->heads_kv, p->head_dim}) ||
      !expect_shape(ctx, v, "v", {p->batch, p->seq_k, p->heads_kv, p->head_dim_v})) {
    return false;
  }
  if (p->heads_kv < 1 || p->heads % p->heads_kv != 0) {
    fail(ctx, TF_INVALID_ARGUMENT,
         "heads of q (" + std::to_string(p->heads) + ") must be a multiple of heads of k (" +
             std::to_string(p->heads_kv) + ")");
    return false;
  }
  const int64_t n = TF_Dim(slopes, 0);
  if (TF_NumDims(slopes) == 1 && n == 0) {
    p->alibi_kind = 0;
  } else if (TF_NumDims(slopes) == 1 && n == p->heads) {
    p->alibi_kind = 1;
  } else if (TF_NumDims(slopes) == 2 && n == p->batch && TF_Dim(slopes, 1) == p->heads) {
    p->alibi_kind = 2;
  } else {
    fail(ctx, TF_INVALID_ARGUMENT,
         "alibi_slopes must have shape [0], [" + std::to_string(p->heads) + "] or [" +
             std::to_string(p->batch) + ", " + std::to_string(p->heads) + "], got " +
             shape_string(slopes));
    return false;
  }
  p->softmax_scale = a.softmax_scale;
  p->window_left = static_cast<int>(a.window_left);
  p->window_right = static_cast<int>(a.window_right);
  p->softcap = a.softcap;
  p->dropout_rate = a.dropout_rate;
  p->seed_lo = static_cast<uint32_t>(a.seed_lo);
  p->seed_hi = static_cast<uint32_t>(a.seed_hi);
  return true;
}

TF_Tensor* allocate_output(TF_OpKernelContext* ctx, Scope& scope, int index,
                           std::initializer_list<int64_t> dims) {
  size_t bytes = sizeof(float);
  for (int64_t d : dims) bytes *= static_cast<size_t>(d);
  TF_Tensor* t = TF_AllocateOutput(ctx, index, TF_FLOAT, dims.begin(),
                                   static_cast<int>(dims.size()), bytes, scope.status);
  if (TF_GetCode(scope.status) != TF_OK) {
    TF_OpKernelContext_Failure(ctx, scope.status);
    return nullptr;
  }
  return scope.keep(t);
}

/* Workspace as a uint8 temp tensor; null (and failed) on error. */
void* allocate_workspace(TF_OpKernelContext* ctx, Scope& scope, size_t bytes, bool* ok) {
  *ok = true;
  if (bytes == 0) return nullptr;
  TF_AllocatorAttributes attrs;
  memset(&attrs, 0, sizeof(attrs));
  attrs.struct_size = TF_ALLOCATOR_ATTRIBUTES_STRUCT_SIZE;
  attrs.on_host = 0;
  const int64_t dims[1] = {static_cast<int64_t>(bytes)};
  TF_Tensor* t = TF_AllocateTemp(ctx, TF_UINT8, dims, 1, &attrs, scope.status);
  if (TF_GetCode(scope.status) != TF_OK) {
    TF_OpKernelContext_Failure(ctx, scope.status);
    *ok = false;
    return nullptr;
  }
  return TF_TensorData(scope.keep(t));
}

bool check_status(TF_OpKernelContext* ctx, fa_status st, const char* what) {
  if (st == 0) return true;
  fail(ctx, TF_INTERNAL, std::string(what) + ": " + fa_error_string(st));
  return false;
}

const float* data(const TF_Tensor* t) { return static_cast<const float*>(TF_TensorData(t)); }
float* mutable_data(TF_Tensor* t) { return static_cast<float*>(TF_TensorData(t)); }

void compute_forward(void* kernel, TF_OpKernelContext* ctx) {
  const Attrs& a = *static_cast<Attrs*>(kernel);
  Scope scope;
  TF_Tensor* q = get_input(ctx, scope, 0, "q", 4);
  TF_Tensor* k = q ? get_input(ctx, scope, 1, "k", 4) : nullptr;
  TF_Tensor* v = k ? get_input(ctx, scope, 2, "v", 4) : nullptr;
  TF_Tensor* slopes = v ? get_input(ctx, scope, 3, "alibi_slopes", -1) : nullptr;
  fa_params p;
  if (slopes == nullptr || !make_params(ctx, a, q, k, v, slopes, &p)) return;
  TF_Tensor* out = allocate_output(ctx, scope, 0, {p.batch, p.seq_q, p.heads, p.head_dim_v});
  TF_Tensor* lse = out ? allocate_output(ctx, scope, 1, {p.batch, p.heads, p.seq_q}) : nullptr;
  if (lse == nullptr) return;
  bool ok;
  void* ws = allocate_workspace(ctx, scope, fa_forward_workspace_size(&p), &ok);
  if (!ok) return;
  if (!check_status(ctx, fa_use_device_of(TF_TensorData(q)), kForwardOp)) return;
  check_status(ctx,
               fa_forward(&p, data(q), data(k), data(v), p.alibi_kind ? data(slopes) : nullptr,
                          mutable_data(out), mutable_data(lse), ws, fa_legacy_stream()),
               kForwardOp);
}

void compute_backward(void* kernel, TF_OpKernelContext* ctx) {
  const Attrs& a = *static_cast<Attrs*>(kernel);
  Scope scope;
  const char* names[] = {"dy", "d_lse", "q", "k", "v", "out", "softmax_lse", "alibi_slopes"};
  const int ranks[] = {4, 3, 4, 4, 4, 4, 3, -1};
  TF_Tensor* in[8] = {};
  for (int i = 0; i < 8; ++i) {
    in[i] = get_input(ctx, scope, i, names[i], ranks[i]);
    if (in[i] == nullptr) return;
  }
  TF_Tensor *dy = in[0], *dlse = in[1], *q = in[2], *k = in[3], *v = in[4], *out = in[5],
            *lse = in[6], *slopes = in[7];
  fa_params p;
  if (!make_params(ctx, a, q, k, v, slopes, &p)) return;
  if (!expect_shape(ctx, dy, "dy", {p.batch, p.seq_q, p.heads, p.head_dim_v}) ||
      !expect_shape(ctx, out, "out", {p.batch, p.seq_q, p.heads, p.head_dim_v}) ||
      !expect_shape(ctx, dlse, "d_lse", {p.batch, p.heads, p.seq_q}) ||
      !expect_shape(ctx, lse, "softmax_lse", {p.batch, p.heads, p.seq_q})) {
    return;
  }
  TF_Tensor* dq = allocate_output(ctx, scope, 0, {p.batch, p.seq_q, p.heads, p.head_dim});
  TF_Tensor* dk = dq ? allocate_output(ctx, scope, 1, {p.batch, p.seq_k, p.heads_kv, p.head_dim})
                     : nullptr;
  TF_Tensor* dv = dk ? allocate_output(ctx, scope, 2,
                                       {p.batch, p.seq_k, p.heads_kv, p.head_dim_v})
                     : nullptr;
  if (dv == nullptr) return;
  bool ok;
  void* ws = allocate_workspace(ctx, scope, fa_backward_workspace_size(&p), &ok);
  if (!ok) return;
  if (!check_status(ctx, fa_use_device_of(TF_TensorData(q)), kBackwardOp)) return;
  check_status(ctx,
               fa_backward(&p, data(dy), data(dlse), data(q), data(k), data(v), data(out),
                           data(lse), p.alibi_kind ? data(slopes) : nullptr, mutable_data(dq),
                           mutable_data(dk), mutable_data(dv), ws, fa_legacy_stream()),
               kBackwardOp);
}

void unknown_shape(TF_ShapeInferenceContext* ctx, TF_Status* status) {
  TF_ShapeInferenceContextSetUnknownShape(ctx, status);
}

bool register_op(const char* name, std::initializer_list<const char*> inputs,
                 std::initializer_list<const char*> outputs,
                 void (*compute)(void*, TF_OpKernelContext*)) {
  TF_Status* status = TF_NewStatus();
  TF_OpDefinitionBuilder* op = TF_NewOpDefinitionBuilder(name);
  for (const char* in : inputs) TF_OpDefinitionBuilderAddInput(op, in);
  for (const char* out : outputs) TF_OpDefinitionBuilderAddOutput(op, out);
  for (const char* attr : kAttrSpecs) TF_OpDefinitionBuilderAddAttr(op, attr);
  TF_OpDefinitionBuilderSetShapeInferenceFunction(op, unknown_shape);
  TF_RegisterOpDefinition(op, status);  // takes ownership of the builder
  bool ok = TF_GetCode(status) == TF_OK;
  if (ok) {
    TF_KernelBuilder* kb = TF_NewKernelBuilder(name, "GPU", create_kernel, compute, delete_kernel);
    TF_RegisterKernelBuilder(name, kb, status);  // takes ownership of the builder
    ok = TF_GetCode(status) == TF_OK;
  }
  if (!ok) fprintf(stderr, "tfjs-flash-attention: registering %s failed: %s\n", name,
                   TF_Message(status));
  TF_DeleteStatus(status);
  return ok;
}

bool register_all() {
  const bool fwd = register_op(kForwardOp, {"q: float", "k: float", "v: float",
                                            "alibi_slopes: float"},
                               {"out: float", "softmax_lse: float"}, compute_forward);
  const bool bwd = register_op(kBackwardOp,
                               {"dy: float", "d_lse: float", "q: float", "k: float", "v: float",
                                "out: float", "softmax_lse: float", "alibi_slopes: float"},
                               {"dq: float", "dk: float", "dv: float"}, compute_backward);
  return fwd && bwd;
}

// Runs when the library is loaded (inside TF_LoadLibrary).
const bool registered = register_all();

}  // namespace

extern "C" int tfjs_flash_attention_registered(void) { return registered ? 1 : 0; }
