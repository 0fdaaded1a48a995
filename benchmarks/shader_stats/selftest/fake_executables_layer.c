/*
 * Test double for selftest.sh: a Vulkan layer, loaded below the dump layer,
 * that gives a driver without VK_KHR_pipeline_executable_properties
 * (SwiftShader, lavapipe) a fake one, so that the dump layer's in-process
 * path runs end to end in a normal Dawn process on a CPU. It advertises the
 * extension, removes it (and the dump layer's feature struct and capture
 * flags) before the driver sees them, and answers the three queries with
 * fixed values: one executable, three statistics, a SASS-like text and a
 * binary representation. The values are made up; NVIDIA's names may differ
 * (benchmarks/shader_stats_report.ts finds the columns by name).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vulkan/vk_layer.h>
#include <vulkan/vulkan.h>

#define EXPORT __attribute__((visibility("default")))
#define EXEC_EXT VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static PFN_vkGetInstanceProcAddr next_gipa;
static PFN_vkGetDeviceProcAddr next_gdpa;
static VkInstance the_instance;
/* Looked up right after vkCreateInstance, when the chain below is complete. */
static PFN_vkEnumerateDeviceExtensionProperties next_enumerate;

static const char FAKE_SASS[] =
    "        /*0000*/                   MOV R1, c[0x0][0x28] ;\n"
    "        /*0010*/                   S2R R0, SR_TID.X ;\n"
    "        /*0020*/                   IMAD R2, R0, 0x4, RZ ;\n"
    "        /*0030*/                   LDG.E.128 R4, [R2.64] ;\n"
    "        /*0040*/                   STS.128 [R2], R4 ;\n"
    "        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n"
    "        /*0060*/                   LDS.128 R8, [R2] ;\n"
    "        /*0070*/                   LDS R12, [R2+0x10] ;\n"
    "        /*0080*/                   FFMA R13, R8, R12, R13 ;\n"
    "        /*0090*/               @P0 FFMA R14, R9, R12, R14 ;\n"
    "        /*00a0*/                   MUFU.EX2 R15, R13 ;\n"
    "        /*00b0*/                   STG.E [R2.64], R15 ;\n"
    "        /*00c0*/                   EXIT ;\n";

static VKAPI_ATTR VkResult VKAPI_CALL fake_CreateInstance(const VkInstanceCreateInfo *info,
                                                          const VkAllocationCallbacks *alloc,
                                                          VkInstance *instance) {
  VkLayerInstanceCreateInfo *link = (VkLayerInstanceCreateInfo *)info->pNext;
  while (link != NULL && !(link->sType == VK_STRUCTURE_TYPE_LOADER_INSTANCE_CREATE_INFO &&
                           link->function == VK_LAYER_LINK_INFO)) {
    link = (VkLayerInstanceCreateInfo *)link->pNext;
  }
  if (link == NULL) return VK_ERROR_INITIALIZATION_FAILED;
  next_gipa = link->u.pLayerInfo->pfnNextGetInstanceProcAddr;
  link->u.pLayerInfo = link->u.pLayerInfo->pNext;
  VkResult r = ((PFN_vkCreateInstance)next_gipa(NULL, "vkCreateInstance"))(info, alloc, instance);
  if (r == VK_SUCCESS) {
    the_instance = *instance;
    next_enumerate = (PFN_vkEnumerateDeviceExtensionProperties)next_gipa(
        *instance, "vkEnumerateDeviceExtensionProperties");
  }
  return r;
}

static VKAPI_ATTR VkResult VKAPI_CALL fake_EnumerateDeviceExtensionProperties(
    VkPhysicalDevice gpu, const char *layer, uint32_t *count, VkExtensionProperties *props) {
  PFN_vkEnumerateDeviceExtensionProperties next = next_enumerate;
  if (layer != NULL) return next(gpu, layer, count, props);
  uint32_t n = 0;
  next(gpu, NULL, &n, NULL);
  if (props == NULL) {
    *count = n + 1;
    return VK_SUCCESS;
  }
  VkExtensionProperties *all = calloc(n + 1, sizeof(*all));
  next(gpu, NULL, &n, all);
  snprintf(all[n].extensionName, sizeof(all[n].extensionName), "%s", EXEC_EXT);
  all[n].specVersion = 1;
  uint32_t copied = *count < n + 1 ? *count : n + 1;
  memcpy(props, all, copied * sizeof(*all));
  free(all);
  *count = copied;
  return copied < n + 1 ? VK_INCOMPLETE : VK_SUCCESS;
}

static VKAPI_ATTR VkResult VKAPI_CALL fake_CreateDevice(VkPhysicalDevice gpu,
                                                        const VkDeviceCreateInfo *info,
                                                        const VkAllocationCallbacks *alloc,
                                                        VkDevice *device) {
  VkLayerDeviceCreateInfo *link = (VkLayerDeviceCreateInfo *)info->pNext;
  while (link != NULL && !(link->sType == VK_STRUCTURE_TYPE_LOADER_DEVICE_CREATE_INFO &&
                           link->function == VK_LAYER_LINK_INFO)) {
    link = (VkLayerDeviceCreateInfo *)link->pNext;
  }
  if (link == NULL) return VK_ERROR_INITIALIZATION_FAILED;
  PFN_vkGetInstanceProcAddr gipa = link->u.pLayerInfo->pfnNextGetInstanceProcAddr;
  pthread_mutex_lock(&lock);
  next_gdpa = link->u.pLayerInfo->pfnNextGetDeviceProcAddr;
  pthread_mutex_unlock(&lock);
  link->u.pLayerInfo = link->u.pLayerInfo->pNext;
  VkDeviceCreateInfo patched = *info;
  /* The dump layer puts its feature struct first in the chain. */
  const VkBaseInStructure *head = info->pNext;
  const VkStructureType exec_features =
      VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR;
  if (head != NULL && head->sType == exec_features) {
    patched.pNext = head->pNext;
  }
  const char **exts = calloc(info->enabledExtensionCount + 1, sizeof(char *));
  patched.enabledExtensionCount = 0;
  for (uint32_t i = 0; i < info->enabledExtensionCount; i++) {
    if (strcmp(info->ppEnabledExtensionNames[i], EXEC_EXT) != 0) {
      exts[patched.enabledExtensionCount++] = info->ppEnabledExtensionNames[i];
    }
  }
  patched.ppEnabledExtensionNames = exts;
  VkResult r =
      ((PFN_vkCreateDevice)gipa(the_instance, "vkCreateDevice"))(gpu, &patched, alloc, device);
  free(exts);
  return r;
}

static VKAPI_ATTR VkResult VKAPI_CALL fake_CreateComputePipelines(
    VkDevice device, VkPipelineCache cache, uint32_t count,
    const VkComputePipelineCreateInfo *infos, const VkAllocationCallbacks *alloc,
    VkPipeline *pipelines) {
  VkComputePipelineCreateInfo *patched = calloc(count, sizeof(*patched));
  memcpy(patched, infos, count * sizeof(*patched));
  for (uint32_t i = 0; i < count; i++) {
    patched[i].flags &= ~(VkPipelineCreateFlags)(
        VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR |
        VK_PIPELINE_CREATE_CAPTURE_INTERNAL_REPRESENTATIONS_BIT_KHR);
  }
  VkResult r = ((PFN_vkCreateComputePipelines)next_gdpa(device, "vkCreateComputePipelines"))(
      device, cache, count, patched, alloc, pipelines);
  free(patched);
  return r;
}

static VKAPI_ATTR VkResult VKAPI_CALL fake_GetPipelineExecutablePropertiesKHR(
    VkDevice device, const VkPipelineInfoKHR *info, uint32_t *count,
    VkPipelineExecutablePropertiesKHR *props) {
  (void)device;
  (void)info;
  if (props == NULL) {
    *count = 1;
    return VK_SUCCESS;
  }
  if (*count < 1) return VK_INCOMPLETE;
  snprintf(props[0].name, sizeof(props[0].name), "Compute Shader");
  snprintf(props[0].description, sizeof(props[0].description), "fake executable");
  props[0].stages = VK_SHADER_STAGE_COMPUTE_BIT;
  props[0].subgroupSize = 32;
  *count = 1;
  return VK_SUCCESS;
}

static VKAPI_ATTR VkResult VKAPI_CALL fake_GetPipelineExecutableStatisticsKHR(
    VkDevice device, const VkPipelineExecutableInfoKHR *info, uint32_t *count,
    VkPipelineExecutableStatisticKHR *stats) {
  (void)device;
  (void)info;
  static const char *names[] = {"Register Count", "Shared Memory Size", "Local Memory Size"};
  static const uint64_t values[] = {96, 49152, 16};
  if (stats == NULL) {
    *count = 3;
    return VK_SUCCESS;
  }
  uint32_t n = *count < 3 ? *count : 3;
  for (uint32_t i = 0; i < n; i++) {
    snprintf(stats[i].name, sizeof(stats[i].name), "%s", names[i]);
    snprintf(stats[i].description, sizeof(stats[i].description), "fake");
    stats[i].format = VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_UINT64_KHR;
    stats[i].value.u64 = values[i];
  }
  *count = n;
  return n < 3 ? VK_INCOMPLETE : VK_SUCCESS;
}

static VKAPI_ATTR VkResult VKAPI_CALL fake_GetPipelineExecutableInternalRepresentationsKHR(
    VkDevice device, const VkPipelineExecutableInfoKHR *info, uint32_t *count,
    VkPipelineExecutableInternalRepresentationKHR *reps) {
  (void)device;
  (void)info;
  static const unsigned char binary[16] = {0xde, 0xad, 0xbe, 0xef};
  if (reps == NULL) {
    *count = 2;
    return VK_SUCCESS;
  }
  uint32_t n = *count < 2 ? *count : 2;
  for (uint32_t i = 0; i < n; i++) {
    const void *data = i == 0 ? (const void *)FAKE_SASS : (const void *)binary;
    size_t size = i == 0 ? sizeof(FAKE_SASS) : sizeof(binary);
    snprintf(reps[i].name, sizeof(reps[i].name), i == 0 ? "SASS" : "Binary");
    snprintf(reps[i].description, sizeof(reps[i].description), "fake");
    reps[i].isText = i == 0;
    if (reps[i].pData != NULL) {
      memcpy(reps[i].pData, data, reps[i].dataSize < size ? reps[i].dataSize : size);
    }
    reps[i].dataSize = size;
  }
  *count = n;
  return n < 2 ? VK_INCOMPLETE : VK_SUCCESS;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetDeviceProcAddr(VkDevice device,
                                                                    const char *name);

static PFN_vkVoidFunction fake_function(const char *name) {
#define HOOK(fn) \
  if (strcmp(name, "vk" #fn) == 0) return (PFN_vkVoidFunction)fake_##fn;
  HOOK(CreateDevice)
  HOOK(EnumerateDeviceExtensionProperties)
  HOOK(CreateComputePipelines)
  HOOK(GetPipelineExecutablePropertiesKHR)
  HOOK(GetPipelineExecutableStatisticsKHR)
  HOOK(GetPipelineExecutableInternalRepresentationsKHR)
#undef HOOK
  return NULL;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetInstanceProcAddr(VkInstance instance,
                                                                      const char *name) {
  if (strcmp(name, "vkGetInstanceProcAddr") == 0) return (PFN_vkVoidFunction)vkGetInstanceProcAddr;
  if (strcmp(name, "vkGetDeviceProcAddr") == 0) return (PFN_vkVoidFunction)vkGetDeviceProcAddr;
  if (strcmp(name, "vkCreateInstance") == 0) return (PFN_vkVoidFunction)fake_CreateInstance;
  PFN_vkVoidFunction own = fake_function(name);
  if (own != NULL) return own;
  return next_gipa != NULL ? next_gipa(instance, name) : NULL;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetDeviceProcAddr(VkDevice device,
                                                                    const char *name) {
  if (strcmp(name, "vkGetDeviceProcAddr") == 0) return (PFN_vkVoidFunction)vkGetDeviceProcAddr;
  if (strcmp(name, "vkCreateComputePipelines") == 0 ||
      strncmp(name, "vkGetPipelineExecutable", 23) == 0) {
    return fake_function(name);
  }
  pthread_mutex_lock(&lock);
  PFN_vkGetDeviceProcAddr next = next_gdpa;
  pthread_mutex_unlock(&lock);
  return next(device, name);
}
