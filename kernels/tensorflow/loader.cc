/*
 * A tiny N-API addon: load(path) hands a custom-op library to the
 * libtensorflow that tfjs-node-gpu already holds (TF_LoadLibrary), so its
 * ops and GPU kernels join TensorFlow's registries and tfjs-node can run them
 * by name. Returns null on success, else TensorFlow's error message.
 */
#include <node_api.h>

#include <string>

#include "tf_c_api.h"

namespace {

napi_value Load(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  size_t length = 0;
  if (argc < 1 || napi_get_value_string_utf8(env, argv[0], nullptr, 0, &length) != napi_ok) {
    napi_throw_type_error(env, nullptr, "load(path): path must be a string");
    return nullptr;
  }
  std::string path(length, '\0');
  napi_get_value_string_utf8(env, argv[0], &path[0], length + 1, &length);
  TF_Status* status = TF_NewStatus();
  // The library stays loaded for the life of the process (its kernels are
  // registered with TensorFlow), so the handle is never released.
  TF_LoadLibrary(path.c_str(), status);
  napi_value result;
  if (TF_GetCode(status) == TF_OK) {
    napi_get_null(env, &result);
  } else {
    const char* message = TF_Message(status);
    napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &result);
  }
  TF_DeleteStatus(status);
  return result;
}

napi_value Init(napi_env env, napi_value exports) {
  napi_value fn;
  napi_create_function(env, "load", NAPI_AUTO_LENGTH, Load, nullptr, &fn);
  napi_set_named_property(env, exports, "load", fn);
  return exports;
}

}  // namespace

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
