/*
 * A Vulkan layer that records the compute shaders an application (Dawn)
 * gives the driver, and what the driver made of them.
 *
 * Enabled with VK_LAYER_PATH=<folder of VkLayer_tfjsfa_shader_stats.json>,
 * VK_INSTANCE_LAYERS=VK_LAYER_TFJSFA_shader_stats and SHADER_STATS_DIR=<dir>
 * (without SHADER_STATS_DIR it only passes calls through). In that folder:
 *
 *   device.txt          the device, its enabled extensions and the feature
 *                       structs of VkDeviceCreateInfo (replayed by
 *                       pipeline_stats.c)
 *   module-NNN.spv      each vkCreateShaderModule's SPIR-V words, as given
 *   pipeline-NNN.txt    each compute pipeline: its module, entry point,
 *                       flags, subgroup size, specialization constants and
 *                       descriptor set / push constant layout
 *   pipeline-NNN.stats  VK_KHR_pipeline_executable_properties of that
 *                       pipeline (stats_common.h's format), when the device
 *                       has the extension: the layer enables it at
 *                       vkCreateDevice and adds the capture flags to every
 *                       compute pipeline. SHADER_STATS_CAPTURE=0 turns this
 *                       off (then only the dumps are written).
 *
 * Files are written before the call returns, so an application that
 * creates pipelines synchronously can tell which files a call made.
 */
#include <pthread.h>
#include <vulkan/vk_layer.h>

#include "stats_common.h"

#define LAYER_NAME "VK_LAYER_TFJSFA_shader_stats"
#define EXPORT __attribute__((visibility("default")))
#define MAX_OBJECTS 16

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Dispatchable handles of one instance (or device) share a dispatch table. */
static void *key_of(const void *handle) { return *(void *const *)handle; }

typedef struct {
  void *key;
  VkInstance instance;
  PFN_vkGetInstanceProcAddr gipa;
  /* Looked up at creation: a layer below may not answer gipa while destroying. */
  PFN_vkDestroyInstance destroy;
} InstanceEntry;

typedef struct {
  void *key;
  VkDevice device;
  PFN_vkGetDeviceProcAddr gdpa;
  PFN_vkDestroyDevice destroy;
  PFN_vkCreateShaderModule create_module;
  PFN_vkCreateComputePipelines create_compute;
  PFN_vkCreateDescriptorSetLayout create_set_layout;
  PFN_vkCreatePipelineLayout create_layout;
  SsExecutableFns fns;
  int capture;
} DeviceEntry;

static InstanceEntry instances[MAX_OBJECTS];
static DeviceEntry devices[MAX_OBJECTS];

/* Non-dispatchable handles seen at creation (handles may be reused). */
typedef struct {
  uint64_t handle;
  int id;
} ModuleRecord;

typedef struct {
  uint64_t handle;
  uint32_t count;
  VkDescriptorSetLayoutBinding *bindings;
} SetLayoutRecord;

typedef struct {
  uint64_t handle;
  uint32_t set_count;
  uint64_t *sets;
  uint32_t push_count;
  VkPushConstantRange *push;
} LayoutRecord;

static ModuleRecord *modules;
static size_t module_count, module_cap;
static SetLayoutRecord *set_layouts;
static size_t set_layout_count, set_layout_cap;
static LayoutRecord *layouts;
static size_t layout_count, layout_cap;
static int next_module_id, next_pipeline_id;

static const char *dump_dir(void) {
  const char *d = getenv("SHADER_STATS_DIR");
  return d != NULL && d[0] != 0 ? d : NULL;
}

static int capture_wanted(void) {
  const char *c = getenv("SHADER_STATS_CAPTURE");
  return dump_dir() != NULL && (c == NULL || strcmp(c, "0") != 0);
}

#define GROW(array, count, cap)                                  \
  do {                                                           \
    if ((count) == (cap)) {                                      \
      (cap) = (cap) ? 2 * (cap) : 64;                            \
      (array) = realloc((array), (cap) * sizeof(*(array)));     \
    }                                                            \
  } while (0)

static InstanceEntry *instance_of(const void *handle) {
  void *key = key_of(handle);
  for (int i = 0; i < MAX_OBJECTS; i++) {
    if (instances[i].key == key) return &instances[i];
  }
  return NULL;
}

static DeviceEntry *device_of(const void *handle) {
  void *key = key_of(handle);
  for (int i = 0; i < MAX_OBJECTS; i++) {
    if (devices[i].key == key) return &devices[i];
  }
  return NULL;
}

static FILE *open_in_dump(const char *name, const char *mode) {
  char path[4096];
  snprintf(path, sizeof(path), "%s/%s", dump_dir(), name);
  return fopen(path, mode);
}

/* Writes SPIR-V words to module-NNN.spv; returns NNN. Caller holds lock. */
static int dump_module(const uint32_t *code, size_t bytes) {
  int id = next_module_id++;
  char name[64];
  snprintf(name, sizeof(name), "module-%03d.spv", id);
  FILE *f = open_in_dump(name, "wb");
  if (f != NULL) {
    fwrite(code, 1, bytes, f);
    fclose(f);
  }
  return id;
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_CreateInstance(const VkInstanceCreateInfo *info,
                                                           const VkAllocationCallbacks *alloc,
                                                           VkInstance *instance) {
  VkLayerInstanceCreateInfo *link = (VkLayerInstanceCreateInfo *)info->pNext;
  while (link != NULL && !(link->sType == VK_STRUCTURE_TYPE_LOADER_INSTANCE_CREATE_INFO &&
                           link->function == VK_LAYER_LINK_INFO)) {
    link = (VkLayerInstanceCreateInfo *)link->pNext;
  }
  if (link == NULL) return VK_ERROR_INITIALIZATION_FAILED;
  PFN_vkGetInstanceProcAddr gipa = link->u.pLayerInfo->pfnNextGetInstanceProcAddr;
  link->u.pLayerInfo = link->u.pLayerInfo->pNext;
  PFN_vkCreateInstance create = (PFN_vkCreateInstance)gipa(NULL, "vkCreateInstance");
  VkResult r = create(info, alloc, instance);
  if (r != VK_SUCCESS) return r;
  pthread_mutex_lock(&lock);
  for (int i = 0; i < MAX_OBJECTS; i++) {
    if (instances[i].key == NULL) {
      instances[i] = (InstanceEntry){key_of(*instance), *instance, gipa,
                                     (PFN_vkDestroyInstance)gipa(*instance, "vkDestroyInstance")};
      break;
    }
  }
  pthread_mutex_unlock(&lock);
  return VK_SUCCESS;
}

static VKAPI_ATTR void VKAPI_CALL layer_DestroyInstance(VkInstance instance,
                                                        const VkAllocationCallbacks *alloc) {
  pthread_mutex_lock(&lock);
  InstanceEntry *e = instance_of(instance);
  PFN_vkDestroyInstance destroy = e ? e->destroy : NULL;
  if (e != NULL) e->key = NULL;
  pthread_mutex_unlock(&lock);
  if (destroy != NULL) destroy(instance, alloc);
}

/* device.txt: what pipeline_stats.c needs to make an equal device. */
static void write_device_record(InstanceEntry *ie, VkPhysicalDevice gpu,
                                const VkDeviceCreateInfo *info, int capture) {
  FILE *f = open_in_dump("device.txt", "w");
  if (f == NULL) return;
  PFN_vkGetPhysicalDeviceProperties get_props =
      (PFN_vkGetPhysicalDeviceProperties)ie->gipa(ie->instance, "vkGetPhysicalDeviceProperties");
  VkPhysicalDeviceProperties p;
  get_props(gpu, &p);
  char name[VK_MAX_PHYSICAL_DEVICE_NAME_SIZE];
  ss_clean(name, sizeof(name), p.deviceName);
  fprintf(f, "device\t%s\t0x%04x\t0x%04x\t0x%x\t%u.%u.%u\n", name, p.vendorID, p.deviceID,
          p.driverVersion, VK_API_VERSION_MAJOR(p.apiVersion), VK_API_VERSION_MINOR(p.apiVersion),
          VK_API_VERSION_PATCH(p.apiVersion));
  fprintf(f, "capture\t%d\n", capture);
  for (uint32_t i = 0; i < info->enabledExtensionCount; i++) {
    fprintf(f, "ext\t%s\n", info->ppEnabledExtensionNames[i]);
  }
  if (info->pEnabledFeatures != NULL) {
    VkPhysicalDeviceFeatures2 f2 = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, NULL,
                                    *info->pEnabledFeatures};
    const unsigned char *bytes = (const unsigned char *)&f2.features;
    fprintf(f, "features\t%d\t", (int)f2.sType);
    for (size_t b = 0; b < sizeof(f2.features); b++) fprintf(f, "%02x", bytes[b]);
    fprintf(f, "\n");
  }
  for (const VkBaseInStructure *s = info->pNext; s != NULL; s = s->pNext) {
    if (s->sType == VK_STRUCTURE_TYPE_LOADER_DEVICE_CREATE_INFO) continue;
    size_t size = ss_feature_struct_size(s->sType);
    if (size == 0) {
      fprintf(f, "unknown\t%d\n", (int)s->sType);
      continue;
    }
    /* The payload after sType and pNext. */
    const unsigned char *bytes = (const unsigned char *)s + sizeof(VkBaseInStructure);
    fprintf(f, "features\t%d\t", (int)s->sType);
    for (size_t b = 0; b < size - sizeof(VkBaseInStructure); b++) fprintf(f, "%02x", bytes[b]);
    fprintf(f, "\n");
  }
  fclose(f);
}

static int device_has_extension(InstanceEntry *ie, VkPhysicalDevice gpu, const char *ext) {
  PFN_vkEnumerateDeviceExtensionProperties enumerate =
      (PFN_vkEnumerateDeviceExtensionProperties)ie->gipa(ie->instance,
                                                         "vkEnumerateDeviceExtensionProperties");
  uint32_t n = 0;
  enumerate(gpu, NULL, &n, NULL);
  VkExtensionProperties *props = calloc(n, sizeof(*props));
  enumerate(gpu, NULL, &n, props);
  int found = 0;
  for (uint32_t i = 0; i < n && !found; i++) found = strcmp(props[i].extensionName, ext) == 0;
  free(props);
  return found;
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_CreateDevice(VkPhysicalDevice gpu,
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
  PFN_vkGetDeviceProcAddr gdpa = link->u.pLayerInfo->pfnNextGetDeviceProcAddr;
  link->u.pLayerInfo = link->u.pLayerInfo->pNext;

  pthread_mutex_lock(&lock);
  InstanceEntry *ie = instance_of(gpu);
  pthread_mutex_unlock(&lock);
  if (ie == NULL) return VK_ERROR_INITIALIZATION_FAILED;
  PFN_vkCreateDevice create = (PFN_vkCreateDevice)gipa(ie->instance, "vkCreateDevice");

  const char *exec_ext = VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME;
  int already = 0;
  for (uint32_t i = 0; i < info->enabledExtensionCount; i++) {
    already |= strcmp(info->ppEnabledExtensionNames[i], exec_ext) == 0;
  }
  int capture = capture_wanted() && device_has_extension(ie, gpu, exec_ext);
  if (dump_dir() != NULL) write_device_record(ie, gpu, info, capture);

  VkDeviceCreateInfo patched = *info;
  VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR exec_features = {
      VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR,
      (void *)info->pNext, VK_TRUE};
  const char **exts = calloc(info->enabledExtensionCount + 1, sizeof(char *));
  memcpy(exts, info->ppEnabledExtensionNames, info->enabledExtensionCount * sizeof(char *));
  if (capture) {
    patched.pNext = &exec_features;
    if (!already) {
      exts[patched.enabledExtensionCount++] = exec_ext;
      patched.ppEnabledExtensionNames = exts;
    }
  }
  VkResult r = create(gpu, &patched, alloc, device);
  free(exts);
  if (r != VK_SUCCESS) return r;

  pthread_mutex_lock(&lock);
  for (int i = 0; i < MAX_OBJECTS; i++) {
    if (devices[i].key != NULL) continue;
    DeviceEntry *e = &devices[i];
    VkDevice d = *device;
    e->key = key_of(d);
    e->device = d;
    e->gdpa = gdpa;
    e->destroy = (PFN_vkDestroyDevice)gdpa(d, "vkDestroyDevice");
    e->create_module = (PFN_vkCreateShaderModule)gdpa(d, "vkCreateShaderModule");
    e->create_compute = (PFN_vkCreateComputePipelines)gdpa(d, "vkCreateComputePipelines");
    e->create_set_layout = (PFN_vkCreateDescriptorSetLayout)gdpa(d, "vkCreateDescriptorSetLayout");
    e->create_layout = (PFN_vkCreatePipelineLayout)gdpa(d, "vkCreatePipelineLayout");
    e->fns.properties = (PFN_vkGetPipelineExecutablePropertiesKHR)gdpa(
        d, "vkGetPipelineExecutablePropertiesKHR");
    e->fns.statistics = (PFN_vkGetPipelineExecutableStatisticsKHR)gdpa(
        d, "vkGetPipelineExecutableStatisticsKHR");
    e->fns.representations = (PFN_vkGetPipelineExecutableInternalRepresentationsKHR)gdpa(
        d, "vkGetPipelineExecutableInternalRepresentationsKHR");
    e->capture = capture && e->fns.properties != NULL && e->fns.statistics != NULL;
    break;
  }
  pthread_mutex_unlock(&lock);
  return VK_SUCCESS;
}

static VKAPI_ATTR void VKAPI_CALL layer_DestroyDevice(VkDevice device,
                                                      const VkAllocationCallbacks *alloc) {
  pthread_mutex_lock(&lock);
  DeviceEntry *e = device_of(device);
  PFN_vkDestroyDevice destroy = e ? e->destroy : NULL;
  if (e != NULL) e->key = NULL;
  pthread_mutex_unlock(&lock);
  if (destroy != NULL) destroy(device, alloc);
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_CreateShaderModule(
    VkDevice device, const VkShaderModuleCreateInfo *info, const VkAllocationCallbacks *alloc,
    VkShaderModule *module) {
  DeviceEntry *e = device_of(device);
  VkResult r = e->create_module(device, info, alloc, module);
  if (r != VK_SUCCESS || dump_dir() == NULL) return r;
  pthread_mutex_lock(&lock);
  GROW(modules, module_count, module_cap);
  int id = dump_module(info->pCode, info->codeSize);
  modules[module_count++] = (ModuleRecord){(uint64_t)*module, id};
  pthread_mutex_unlock(&lock);
  return r;
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_CreateDescriptorSetLayout(
    VkDevice device, const VkDescriptorSetLayoutCreateInfo *info,
    const VkAllocationCallbacks *alloc, VkDescriptorSetLayout *set_layout) {
  DeviceEntry *e = device_of(device);
  VkResult r = e->create_set_layout(device, info, alloc, set_layout);
  if (r != VK_SUCCESS || dump_dir() == NULL) return r;
  pthread_mutex_lock(&lock);
  GROW(set_layouts, set_layout_count, set_layout_cap);
  SetLayoutRecord rec = {(uint64_t)*set_layout, info->bindingCount,
                         calloc(info->bindingCount + 1, sizeof(VkDescriptorSetLayoutBinding))};
  memcpy(rec.bindings, info->pBindings, info->bindingCount * sizeof(VkDescriptorSetLayoutBinding));
  set_layouts[set_layout_count++] = rec;
  pthread_mutex_unlock(&lock);
  return r;
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_CreatePipelineLayout(
    VkDevice device, const VkPipelineLayoutCreateInfo *info, const VkAllocationCallbacks *alloc,
    VkPipelineLayout *layout) {
  DeviceEntry *e = device_of(device);
  VkResult r = e->create_layout(device, info, alloc, layout);
  if (r != VK_SUCCESS || dump_dir() == NULL) return r;
  pthread_mutex_lock(&lock);
  GROW(layouts, layout_count, layout_cap);
  LayoutRecord rec = {(uint64_t)*layout, info->setLayoutCount,
                      calloc(info->setLayoutCount + 1, sizeof(uint64_t)),
                      info->pushConstantRangeCount,
                      calloc(info->pushConstantRangeCount + 1, sizeof(VkPushConstantRange))};
  for (uint32_t s = 0; s < info->setLayoutCount; s++) rec.sets[s] = (uint64_t)info->pSetLayouts[s];
  memcpy(rec.push, info->pPushConstantRanges,
         info->pushConstantRangeCount * sizeof(VkPushConstantRange));
  layouts[layout_count++] = rec;
  pthread_mutex_unlock(&lock);
  return r;
}

/* The latest record of a handle (handles of destroyed objects may be reused). */
#define FIND_LAST(array, count, h, out)                                  \
  do {                                                                   \
    (out) = NULL;                                                        \
    for (size_t i_ = (count); i_ > 0; i_--) {                            \
      if ((array)[i_ - 1].handle == (h)) {                               \
        (out) = &(array)[i_ - 1];                                        \
        break;                                                           \
      }                                                                  \
    }                                                                    \
  } while (0)

/* pipeline-NNN.txt. Caller holds lock. */
static void write_pipeline_record(int id, const VkComputePipelineCreateInfo *info) {
  const VkPipelineShaderStageCreateInfo *stage = &info->stage;
  int module_id = -1;
  if (stage->module != VK_NULL_HANDLE) {
    ModuleRecord *m;
    FIND_LAST(modules, module_count, (uint64_t)stage->module, m);
    if (m != NULL) module_id = m->id;
  }
  uint32_t required_subgroup = 0;
  /* Dawn may relax robustness per pipeline; that changes the bounds checks. */
  const VkPipelineRobustnessCreateInfoEXT *robustness = NULL;
  for (const VkBaseInStructure *s = info->pNext; s != NULL; s = s->pNext) {
    if (s->sType == VK_STRUCTURE_TYPE_PIPELINE_ROBUSTNESS_CREATE_INFO_EXT) {
      robustness = (const VkPipelineRobustnessCreateInfoEXT *)s;
    }
  }
  for (const VkBaseInStructure *s = stage->pNext; s != NULL; s = s->pNext) {
    if (s->sType == VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO && module_id < 0) {
      const VkShaderModuleCreateInfo *mi = (const VkShaderModuleCreateInfo *)s;
      module_id = dump_module(mi->pCode, mi->codeSize);
    } else if (s->sType == VK_STRUCTURE_TYPE_PIPELINE_ROBUSTNESS_CREATE_INFO_EXT) {
      robustness = (const VkPipelineRobustnessCreateInfoEXT *)s;
    } else if (s->sType ==
               VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_REQUIRED_SUBGROUP_SIZE_CREATE_INFO) {
      required_subgroup =
          ((const VkPipelineShaderStageRequiredSubgroupSizeCreateInfo *)s)->requiredSubgroupSize;
    }
  }
  char name[64];
  snprintf(name, sizeof(name), "pipeline-%03d.txt", id);
  FILE *f = open_in_dump(name, "w");
  if (f == NULL) return;
  fprintf(f, "module\tmodule-%03d.spv\n", module_id);
  fprintf(f, "entry\t%s\n", stage->pName);
  fprintf(f, "flags\t0x%x\n", (unsigned)info->flags);
  fprintf(f, "stage_flags\t0x%x\n", (unsigned)stage->flags);
  if (required_subgroup != 0) fprintf(f, "required_subgroup_size\t%u\n", required_subgroup);
  if (robustness != NULL) {
    fprintf(f, "robustness\t%d\t%d\t%d\t%d\n", (int)robustness->storageBuffers,
            (int)robustness->uniformBuffers, (int)robustness->vertexInputs,
            (int)robustness->images);
  }
  const VkSpecializationInfo *spec = stage->pSpecializationInfo;
  for (uint32_t i = 0; spec != NULL && i < spec->mapEntryCount; i++) {
    const VkSpecializationMapEntry *m = &spec->pMapEntries[i];
    fprintf(f, "spec\t%u\t", m->constantID);
    for (size_t b = 0; b < m->size; b++) {
      fprintf(f, "%02x", ((const unsigned char *)spec->pData)[m->offset + b]);
    }
    fprintf(f, "\n");
  }
  LayoutRecord *layout;
  FIND_LAST(layouts, layout_count, (uint64_t)info->layout, layout);
  for (uint32_t s = 0; layout != NULL && s < layout->set_count; s++) {
    SetLayoutRecord *set;
    FIND_LAST(set_layouts, set_layout_count, layout->sets[s], set);
    fprintf(f, "set\t%u\n", s);
    for (uint32_t b = 0; set != NULL && b < set->count; b++) {
      const VkDescriptorSetLayoutBinding *x = &set->bindings[b];
      fprintf(f, "binding\t%u\t%u\t%d\t%u\t0x%x\n", s, x->binding, (int)x->descriptorType,
              x->descriptorCount, (unsigned)x->stageFlags);
    }
  }
  for (uint32_t p = 0; layout != NULL && p < layout->push_count; p++) {
    fprintf(f, "push\t%u\t%u\t0x%x\n", layout->push[p].offset, layout->push[p].size,
            (unsigned)layout->push[p].stageFlags);
  }
  fclose(f);
}

static VKAPI_ATTR VkResult VKAPI_CALL layer_CreateComputePipelines(
    VkDevice device, VkPipelineCache cache, uint32_t count,
    const VkComputePipelineCreateInfo *infos, const VkAllocationCallbacks *alloc,
    VkPipeline *pipelines) {
  DeviceEntry *e = device_of(device);
  if (dump_dir() == NULL) return e->create_compute(device, cache, count, infos, alloc, pipelines);
  const VkPipelineCreateFlags capture_flags =
      VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR |
      VK_PIPELINE_CREATE_CAPTURE_INTERNAL_REPRESENTATIONS_BIT_KHR;
  VkComputePipelineCreateInfo *patched = calloc(count, sizeof(*patched));
  SsPipelineCreateFlags2CreateInfo *flags2 = calloc(count, sizeof(*flags2));
  memcpy(patched, infos, count * sizeof(*patched));
  for (uint32_t i = 0; e->capture && i < count; i++) {
    patched[i].flags |= capture_flags;
    /* A VkPipelineCreateFlags2CreateInfo in the chain replaces `flags`. */
    const VkBaseInStructure *s = patched[i].pNext;
    if (s != NULL && s->sType == SS_STYPE_PIPELINE_CREATE_FLAGS_2_CREATE_INFO) {
      flags2[i] = *(const SsPipelineCreateFlags2CreateInfo *)s;
      flags2[i].flags |= capture_flags;
      patched[i].pNext = &flags2[i];
    }
  }
  VkResult r = e->create_compute(device, cache, count, patched, alloc, pipelines);
  pthread_mutex_lock(&lock);
  for (uint32_t i = 0; i < count; i++) {
    if (pipelines[i] == VK_NULL_HANDLE) continue;
    int id = next_pipeline_id++;
    write_pipeline_record(id, &infos[i]);
    if (e->capture) {
      char name[64], prefix[4096];
      snprintf(name, sizeof(name), "pipeline-%03d.stats", id);
      snprintf(prefix, sizeof(prefix), "%s/pipeline-%03d", dump_dir(), id);
      FILE *f = open_in_dump(name, "w");
      if (f != NULL) {
        ss_write_report(f, device, pipelines[i], &e->fns, prefix);
        fclose(f);
      }
    }
  }
  pthread_mutex_unlock(&lock);
  free(patched);
  free(flags2);
  return r;
}

static PFN_vkVoidFunction layer_function(const char *name) {
#define HOOK(fn) \
  if (strcmp(name, "vk" #fn) == 0) return (PFN_vkVoidFunction)layer_##fn;
  HOOK(CreateInstance)
  HOOK(DestroyInstance)
  HOOK(CreateDevice)
  HOOK(DestroyDevice)
  HOOK(CreateShaderModule)
  HOOK(CreateDescriptorSetLayout)
  HOOK(CreatePipelineLayout)
  HOOK(CreateComputePipelines)
#undef HOOK
  return NULL;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetDeviceProcAddr(VkDevice device,
                                                                    const char *name);

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetInstanceProcAddr(VkInstance instance,
                                                                      const char *name) {
  if (strcmp(name, "vkGetInstanceProcAddr") == 0) return (PFN_vkVoidFunction)vkGetInstanceProcAddr;
  if (strcmp(name, "vkGetDeviceProcAddr") == 0) return (PFN_vkVoidFunction)vkGetDeviceProcAddr;
  PFN_vkVoidFunction own = layer_function(name);
  if (own != NULL) return own;
  if (instance == VK_NULL_HANDLE) return NULL;
  pthread_mutex_lock(&lock);
  InstanceEntry *e = instance_of(instance);
  pthread_mutex_unlock(&lock);
  return e != NULL ? e->gipa(instance, name) : NULL;
}

EXPORT VKAPI_ATTR PFN_vkVoidFunction VKAPI_CALL vkGetDeviceProcAddr(VkDevice device,
                                                                    const char *name) {
  if (strcmp(name, "vkGetDeviceProcAddr") == 0) return (PFN_vkVoidFunction)vkGetDeviceProcAddr;
  pthread_mutex_lock(&lock);
  DeviceEntry *e = device_of(device);
  pthread_mutex_unlock(&lock);
  if (e == NULL) return NULL;
  if (strcmp(name, "vkDestroyDevice") == 0 || strcmp(name, "vkCreateShaderModule") == 0 ||
      strcmp(name, "vkCreateDescriptorSetLayout") == 0 ||
      strcmp(name, "vkCreatePipelineLayout") == 0 ||
      strcmp(name, "vkCreateComputePipelines") == 0) {
    return layer_function(name);
  }
  return e->gdpa(device, name);
}
