// A test double of TensorFlow's C API (the functions of
// kernels/tensorflow/tf_c_api.h) and of kernels/cuda's C ABI, so that the
// op library's registration and Compute code runs on a machine with neither
// libtensorflow nor a GPU. Built by test/tensorflow_kernels.test.ts:
//
//   g++ -rdynamic fake_tf.cc fake_fa.cc -ldl -o fake_tf  (the "TensorFlow")
//   g++ -shared flash_attention_op.cc -o op.so          (undefined TF_*, fa_*)
//   ./fake_tf op.so   -> JSON lines on stdout
//
// TF_LoadLibrary dlopens the library like TensorFlow's does; its static
// initialiser then registers through the fake, which records everything.
// Scenarios then build kernels and run Compute on host tensors; the fake
// fa_forward / fa_backward (fake_fa.cc) record the fa_params they get and
// write a recognisable pattern into the outputs.
//
// With -DFAKE_TF_LIBRARY -shared it is instead a stand-in libtensorflow.so.2
// (no scenarios), for building the real loader addon and op library with
// scripts/build-cuda.js in test/build_cuda.test.ts.
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "../../kernels/cuda/flash_attention.h"
#include "../../kernels/tensorflow/tf_c_api.h"

struct TF_Status {
  TF_Code code = TF_OK;
  std::string message;
};
struct TF_Tensor {
  TF_DataType dtype;
  std::vector<int64_t> dims;
  std::vector<float> data;  // float32 (or bytes, rounded up) on the "device"
  bool owned_by_ctx = false;
};
struct TF_Library {
  void* handle;
};
struct TF_OpDefinitionBuilder {
  std::string name;
  std::vector<std::string> inputs, outputs, attrs;
  bool has_shape_fn = false;
};
struct TF_KernelBuilder {
  std::string op, device;
  void* (*create)(TF_OpKernelConstruction*);
  void (*compute)(void*, TF_OpKernelContext*);
  void (*destroy)(void*);
};
struct TF_OpKernelConstruction {
  std::map<std::string, double> attrs;
  TF_Status failure;
};
struct TF_OpKernelContext {
  std::vector<TF_Tensor*> inputs;
  std::vector<TF_Tensor*> outputs;
  std::vector<TF_Tensor*> temps;
  TF_Status failure;
  int failures = 0;
};
struct TF_ShapeInferenceContext {
  int unknown = 0;
};

static std::vector<TF_OpDefinitionBuilder*> g_ops;
static std::vector<TF_KernelBuilder*> g_kernels;
static int g_live_tensors = 0;
// Kept by the fake CUDA kernels (fake_fa.cc).
extern std::vector<std::string> g_calls;
extern int g_device_calls;
extern const char* g_fail_with;

extern "C" {

TF_Status* TF_NewStatus(void) { return new TF_Status(); }
void TF_DeleteStatus(TF_Status* s) { delete s; }
void TF_SetStatus(TF_Status* s, TF_Code code, const char* msg) {
  s->code = code;
  s->message = msg;
}
TF_Code TF_GetCode(const TF_Status* s) { return s->code; }
const char* TF_Message(const TF_Status* s) { return s->message.c_str(); }

void TF_DeleteTensor(TF_Tensor* t) {
  // Inputs, outputs and temps belong to the context; the handles the
  // kernel gets are views (as TF_TensorFromTensor makes), counted here.
  --g_live_tensors;
  (void)t;
}
TF_DataType TF_TensorType(const TF_Tensor* t) { return t->dtype; }
int TF_NumDims(const TF_Tensor* t) { return static_cast<int>(t->dims.size()); }
int64_t TF_Dim(const TF_Tensor* t, int i) { return t->dims.at(i); }
size_t TF_TensorByteSize(const TF_Tensor* t) { return t->data.size() * sizeof(float); }
void* TF_TensorData(const TF_Tensor* t) {
  return const_cast<float*>(t->data.data());
}

TF_Library* TF_LoadLibrary(const char* path, TF_Status* status) {
  void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    TF_SetStatus(status, TF_INVALID_ARGUMENT, dlerror());
    return nullptr;
  }
  TF_SetStatus(status, TF_OK, "");
  return new TF_Library{handle};
}

TF_OpDefinitionBuilder* TF_NewOpDefinitionBuilder(const char* name) {
  auto* b = new TF_OpDefinitionBuilder();
  b->name = name;
  return b;
}
void TF_RegisterOpDefinition(TF_OpDefinitionBuilder* b, TF_Status* status) {
  for (auto* op : g_ops) {
    if (op->name == b->name) {
      TF_SetStatus(status, TF_INVALID_ARGUMENT, ("op " + b->name + " already registered").c_str());
      delete b;
      return;
    }
  }
  g_ops.push_back(b);
  TF_SetStatus(status, TF_OK, "");
}
void TF_OpDefinitionBuilderAddAttr(TF_OpDefinitionBuilder* b, const char* spec) {
  b->attrs.push_back(spec);
}
void TF_OpDefinitionBuilderAddInput(TF_OpDefinitionBuilder* b, const char* spec) {
  b->inputs.push_back(spec);
}
void TF_OpDefinitionBuilderAddOutput(TF_OpDefinitionBuilder* b, const char* spec) {
  b->outputs.push_back(spec);
}
void TF_OpDefinitionBuilderSetShapeInferenceFunction(
    TF_OpDefinitionBuilder* b, void (*fn)(TF_ShapeInferenceContext*, TF_Status*)) {
  TF_ShapeInferenceContext ctx;
  TF_Status status;
  fn(&ctx, &status);  // must set an (unknown) shape and succeed
  b->has_shape_fn = ctx.unknown == 1 && status.code == TF_OK;
}
void TF_ShapeInferenceContextSetUnknownShape(TF_ShapeInferenceContext* ctx, TF_Status* status) {
  ctx->unknown++;
  TF_SetStatus(status, TF_OK, "");
}

TF_KernelBuilder* TF_NewKernelBuilder(const char* op, const char* device,
                                      void* (*create)(TF_OpKernelConstruction*),
                                      void (*compute)(void*, TF_OpKernelContext*),
                                      void (*destroy)(void*)) {
  return new TF_KernelBuilder{op, device, create, compute, destroy};
}
void TF_RegisterKernelBuilder(const char* name, TF_KernelBuilder* b, TF_Status* status) {
  (void)name;
  g_kernels.push_back(b);
  TF_SetStatus(status, TF_OK, "");
}
static void get_attr(TF_OpKernelConstruction* ctx, const char* name, double* out,
                     TF_Status* status) {
  auto it = ctx->attrs.find(name);
  if (it == ctx->attrs.end()) {
    TF_SetStatus(status, TF_INVALID_ARGUMENT, (std::string("no attr named ") + name).c_str());
    return;
  }
  *out = it->second;
  TF_SetStatus(status, TF_OK, "");
}
void TF_OpKernelConstruction_GetAttrFloat(TF_OpKernelConstruction* ctx, const char* name,
                                          float* val, TF_Status* status) {
  double d = 0;
  get_attr(ctx, name, &d, status);
  *val = static_cast<float>(d);
}
void TF_OpKernelConstruction_GetAttrInt64(TF_OpKernelConstruction* ctx, const char* name,
                                          int64_t* val, TF_Status* status) {
  double d = 0;
  get_attr(ctx, name, &d, status);
  *val = static_cast<int64_t>(d);
}
void TF_OpKernelConstruction_Failure(TF_OpKernelConstruction* ctx, TF_Status* status) {
  ctx->failure = *status;
}
int TF_NumInputs(TF_OpKernelContext* ctx) { return static_cast<int>(ctx->inputs.size()); }
void TF_GetInput(TF_OpKernelContext* ctx, int i, TF_Tensor** tensor, TF_Status* status) {
  if (i < 0 || i >= static_cast<int>(ctx->inputs.size())) {
    TF_SetStatus(status, TF_INVALID_ARGUMENT, "input index out of range");
    return;
  }
  ++g_live_tensors;
  *tensor = ctx->inputs[i];
  TF_SetStatus(status, TF_OK, "");
}
void TF_OpKernelContext_Failure(TF_OpKernelContext* ctx, TF_Status* status) {
  ctx->failure = *status;
  ctx->failures++;
}
static TF_Tensor* make_tensor(TF_DataType dtype, const int64_t* dims, int n, size_t bytes) {
  auto* t = new TF_Tensor();
  t->dtype = dtype;
  t->dims.assign(dims, dims + n);
  t->data.assign((bytes + sizeof(float) - 1) / sizeof(float), NAN);  // poisoned
  return t;
}
TF_Tensor* TF_AllocateOutput(TF_OpKernelContext* ctx, int index, TF_DataType dtype,
                             const int64_t* dims, int n, size_t len, TF_Status* status) {
  size_t elems = 1;
  for (int i = 0; i < n; ++i) elems *= static_cast<size_t>(dims[i]);
  if (dtype != TF_FLOAT || len != elems * sizeof(float)) {
    TF_SetStatus(status, TF_INVALID_ARGUMENT, "len does not match the shape");
    return nullptr;
  }
  if (static_cast<int>(ctx->outputs.size()) <= index) ctx->outputs.resize(index + 1, nullptr);
  ctx->outputs[index] = make_tensor(dtype, dims, n, len);
  ++g_live_tensors;
  TF_SetStatus(status, TF_OK, "");
  return ctx->outputs[index];
}
TF_Tensor* TF_AllocateTemp(TF_OpKernelContext* ctx, TF_DataType dtype, const int64_t* dims,
                           int n, TF_AllocatorAttributes* attrs, TF_Status* status) {
  if (attrs == nullptr || attrs->struct_size != TF_ALLOCATOR_ATTRIBUTES_STRUCT_SIZE ||
      attrs->on_host) {
    TF_SetStatus(status, TF_INVALID_ARGUMENT, "bad allocator attributes");
    return nullptr;
  }
  size_t bytes = dtype == TF_UINT8 ? 1 : sizeof(float);
  for (int i = 0; i < n; ++i) bytes *= static_cast<size_t>(dims[i]);
  ctx->temps.push_back(make_tensor(dtype, dims, n, bytes));
  ++g_live_tensors;
  TF_SetStatus(status, TF_OK, "");
  return ctx->temps.back();
}

}  // extern "C"

#ifndef FAKE_TF_LIBRARY
// ------------------------------------------------ scenarios

static TF_Tensor* host(std::vector<int64_t> dims, float fill, TF_DataType dtype = TF_FLOAT) {
  size_t n = 1;
  for (auto d : dims) n *= static_cast<size_t>(d);
  auto* t = make_tensor(dtype, dims.data(), static_cast<int>(dims.size()), n * sizeof(float));
  for (auto& x : t->data) x = fill;
  return t;
}

static std::string shape_json(const TF_Tensor* t) {
  std::string s = "[";
  for (size_t i = 0; i < t->dims.size(); ++i) s += (i ? "," : "") + std::to_string(t->dims[i]);
  return s + "]";
}

// A JSON number; NaN (an element never written) as null.
static std::string num(float x) { return std::isnan(x) ? "null" : std::to_string(x); }

static std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

static TF_KernelBuilder* kernel_for(const std::string& op) {
  for (auto* k : g_kernels) {
    if (k->op == op) return k;
  }
  return nullptr;
}

// Runs one Compute and prints what came out.
static void scenario(const char* name, const std::string& op, std::map<std::string, double> attrs,
                     std::vector<TF_Tensor*> inputs) {
  TF_KernelBuilder* kb = kernel_for(op);
  TF_OpKernelConstruction construction;
  construction.attrs = attrs;
  void* kernel = kb->create(&construction);
  TF_OpKernelContext ctx;
  ctx.inputs = inputs;
  const size_t calls_before = g_calls.size();
  g_device_calls = 0;
  const int live_before = g_live_tensors;
  if (construction.failure.code == TF_OK) kb->compute(kernel, &ctx);
  kb->destroy(kernel);
  std::string outs = "[";
  for (size_t i = 0; i < ctx.outputs.size(); ++i) {
    const TF_Tensor* t = ctx.outputs[i];
    outs += (i ? "," : "");
    outs += t ? "{\"shape\":" + shape_json(t) + ",\"first\":" + num(t->data[0]) +
                    ",\"last\":" + num(t->data.back()) + "}"
              : "null";
  }
  outs += "]";
  printf("{\"scenario\":\"%s\",\"construction_error\":\"%s\",\"error\":\"%s\",\"failures\":%d,"
         "\"outputs\":%s,\"temps\":%zu,\"leaked_handles\":%d,\"call\":%s}\n",
         name, escape(construction.failure.message).c_str(), escape(ctx.failure.message).c_str(),
         ctx.failures, outs.c_str(), ctx.temps.size(), g_live_tensors - live_before,
         g_calls.size() > calls_before ? g_calls.back().c_str() : "null");
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: fake_tf <op library>\n");
    return 2;
  }
  TF_Status status;
  TF_Library* lib = TF_LoadLibrary(argv[1], &status);
  printf("{\"load\":\"%s\"}\n", status.code == TF_OK ? "ok" : escape(status.message).c_str());
  if (lib == nullptr) return 1;
  for (auto* op : g_ops) {
    printf("{\"op\":\"%s\",\"inputs\":[", op->name.c_str());
    for (size_t i = 0; i < op->inputs.size(); ++i) printf("%s\"%s\"", i ? "," : "", op->inputs[i].c_str());
    printf("],\"outputs\":[");
    for (size_t i = 0; i < op->outputs.size(); ++i) printf("%s\"%s\"", i ? "," : "", op->outputs[i].c_str());
    printf("],\"attrs\":[");
    for (size_t i = 0; i < op->attrs.size(); ++i) printf("%s\"%s\"", i ? "," : "", op->attrs[i].c_str());
    printf("],\"shape_fn\":%s}\n", op->has_shape_fn ? "true" : "false");
  }
  for (auto* k : g_kernels) printf("{\"kernel\":\"%s\",\"device\":\"%s\"}\n", k->op.c_str(), k->device.c_str());
  // A second load registers nothing twice (TensorFlow refuses duplicates).
  const std::map<std::string, double> attrs = {
      {"softmax_scale", 0.25}, {"window_left", 7}, {"window_right", 0}, {"softcap", 3.5},
      {"dropout_rate", 0.125}, {"seed_lo", 4294967295.0}, {"seed_hi", 12}};
  const int B = 2, Sq = 5, Sk = 6, H = 4, Hk = 2, D = 8, Dv = 3;
  scenario("forward", "TfjsFlashAttention", attrs,
           {host({B, Sq, H, D}, 1), host({B, Sk, Hk, D}, 2), host({B, Sk, Hk, Dv}, 3), host({0}, 0)});
  scenario("forward alibi [B,H]", "TfjsFlashAttention", attrs,
           {host({B, Sq, H, D}, 1), host({B, Sk, Hk, D}, 2), host({B, Sk, Hk, Dv}, 3), host({B, H}, 0.5)});
  scenario("forward alibi [H]", "TfjsFlashAttention", attrs,
           {host({B, Sq, H, D}, 1), host({B, Sk, Hk, D}, 2), host({B, Sk, Hk, Dv}, 3), host({H}, 0.5)});
  scenario("bad k", "TfjsFlashAttention", attrs,
           {host({B, Sq, H, D}, 1), host({B, Sk, Hk, D + 1}, 2), host({B, Sk, Hk, Dv}, 3), host({0}, 0)});
  scenario("bad heads", "TfjsFlashAttention", attrs,
           {host({B, Sq, 3, D}, 1), host({B, Sk, 2, D}, 2), host({B, Sk, 2, Dv}, 3), host({0}, 0)});
  scenario("bad alibi", "TfjsFlashAttention", attrs,
           {host({B, Sq, H, D}, 1), host({B, Sk, Hk, D}, 2), host({B, Sk, Hk, Dv}, 3), host({H + 1}, 0)});
  scenario("bad dtype", "TfjsFlashAttention", attrs,
           {host({B, Sq, H, D}, 1, TF_UINT8), host({B, Sk, Hk, D}, 2), host({B, Sk, Hk, Dv}, 3), host({0}, 0)});
  scenario("bad rank", "TfjsFlashAttention", attrs,
           {host({B, Sq, H}, 1), host({B, Sk, Hk, D}, 2), host({B, Sk, Hk, Dv}, 3), host({0}, 0)});
  scenario("missing attr", "TfjsFlashAttention", {{"softmax_scale", 1}},
           {host({B, Sq, H, D}, 1), host({B, Sk, Hk, D}, 2), host({B, Sk, Hk, Dv}, 3), host({0}, 0)});
  g_fail_with = "x";
  scenario("kernel error", "TfjsFlashAttention", attrs,
           {host({B, Sq, H, D}, 1), host({B, Sk, Hk, D}, 2), host({B, Sk, Hk, Dv}, 3), host({0}, 0)});
  g_fail_with = nullptr;
  scenario("backward", "TfjsFlashAttentionGrad", attrs,
           {host({B, Sq, H, Dv}, 1), host({B, H, Sq}, 0), host({B, Sq, H, D}, 1), host({B, Sk, Hk, D}, 2),
            host({B, Sk, Hk, Dv}, 3), host({B, Sq, H, Dv}, 1), host({B, H, Sq}, 0), host({H}, 0.5)});
  scenario("backward bad lse", "TfjsFlashAttentionGrad", attrs,
           {host({B, Sq, H, Dv}, 1), host({B, H, Sq}, 0), host({B, Sq, H, D}, 1), host({B, Sk, Hk, D}, 2),
            host({B, Sk, Hk, Dv}, 3), host({B, Sq, H, Dv}, 1), host({B, Sq, H}, 0), host({0}, 0)});
  TF_Library* again = TF_LoadLibrary(argv[1], &status);
  printf("{\"reload\":\"%s\",\"ops\":%zu,\"kernels\":%zu}\n", again ? "ok" : "failed", g_ops.size(),
         g_kernels.size());
  return 0;
}
#endif  // FAKE_TF_LIBRARY
