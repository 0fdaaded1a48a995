/*
 * Replays the compute pipelines that dump_layer.c recorded on a device of
 * this machine, with VK_KHR_pipeline_executable_properties' capture flags,
 * and writes each one's statistics and internal representations.
 *
 *   pipeline_stats [--gpu N] [--list] DUMP_DIR [pipeline-NNN.txt ...]
 *
 * The device gets the extensions and feature structs recorded in
 * DUMP_DIR/device.txt (those this device supports), plus
 * pipelineExecutableInfo; each pipeline its module, entry point, flags,
 * required subgroup size, robustness, specialization and layout. Writes
 * DUMP_DIR/pipeline-NNN.replay.stats (stats_common.h's format) and
 * pipeline-NNN.replay.eI.rK.txt; prints one line per pipeline. Loads
 * libvulkan.so.1 at run time, so it builds with the headers alone:
 *
 *   gcc -O2 -I include -o pipeline_stats pipeline_stats.c -ldl
 */
#include <dlfcn.h>

#include "stats_common.h"

static PFN_vkGetInstanceProcAddr gipa;
static VkInstance instance;

#define INSTANCE_FN(name) ((PFN_##name)gipa(instance, #name))

static void die(const char *what, VkResult r) {
  fprintf(stderr, "pipeline_stats: %s failed (VkResult %d)\n", what, (int)r);
  exit(1);
}

static char *read_file(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *data = malloc(n + 4);
  size_t got = fread(data, 1, n, f);
  fclose(f);
  data[got] = 0;
  if (size != NULL) *size = got;
  return data;
}

/* Splits `line` at tabs in place; returns the field count (at most max). */
static int split_tabs(char *line, char **fields, int max) {
  int n = 0;
  char *p = line;
  while (n < max) {
    fields[n++] = p;
    char *tab = strchr(p, '\t');
    if (tab == NULL) break;
    *tab = 0;
    p = tab + 1;
  }
  char *nl = strchr(fields[n - 1], '\n');
  if (nl != NULL) *nl = 0;
  return n;
}

static void parse_hex(const char *hex, unsigned char *out, size_t max) {
  for (size_t i = 0; i < max && hex[2 * i] != 0 && hex[2 * i + 1] != 0; i++) {
    unsigned v;
    sscanf(hex + 2 * i, "%2x", &v);
    out[i] = (unsigned char)v;
  }
}

/* A feature struct of the chain: what the device supports, masked by the record. */
typedef struct Feature {
  VkBaseOutStructure *data;
  size_t size;
} Feature;

/* Feature structs hold VkBool32s after sType and pNext. */
static void and_bools(unsigned char *enabled, const unsigned char *supported, size_t size) {
  for (size_t b = sizeof(VkBaseOutStructure); b + 4 <= size; b += 4) {
    uint32_t e, s;
    memcpy(&e, enabled + b, 4);
    memcpy(&s, supported + b, 4);
    e = e && s;
    memcpy(enabled + b, &e, 4);
  }
}

static int has_extension(VkExtensionProperties *props, uint32_t n, const char *name) {
  for (uint32_t i = 0; i < n; i++) {
    if (strcmp(props[i].extensionName, name) == 0) return 1;
  }
  return 0;
}

static VkPhysicalDevice pick_gpu(int wanted, int list, const char *vendor_device) {
  uint32_t n = 0;
  INSTANCE_FN(vkEnumeratePhysicalDevices)(instance, &n, NULL);
  if (n == 0) {
    fprintf(stderr, "pipeline_stats: no Vulkan device\n");
    exit(1);
  }
  VkPhysicalDevice *gpus = calloc(n, sizeof(*gpus));
  INSTANCE_FN(vkEnumeratePhysicalDevices)(instance, &n, gpus);
  int chosen = wanted >= 0 && wanted < (int)n ? wanted : -1;
  for (uint32_t i = 0; i < n; i++) {
    VkPhysicalDeviceProperties p;
    INSTANCE_FN(vkGetPhysicalDeviceProperties)(gpus[i], &p);
    char ids[32];
    snprintf(ids, sizeof(ids), "0x%04x\t0x%04x", p.vendorID, p.deviceID);
    if (chosen < 0 && vendor_device != NULL && strcmp(ids, vendor_device) == 0) chosen = (int)i;
    if (list) printf("gpu %u: %s (%s)\n", i, p.deviceName, ids);
  }
  if (list) exit(0);
  VkPhysicalDevice gpu = gpus[chosen < 0 ? 0 : chosen];
  free(gpus);
  return gpu;
}

static VkDevice make_device(VkPhysicalDevice gpu, const char *dir, SsExecutableFns *fns) {
  char path[4096];
  snprintf(path, sizeof(path), "%s/device.txt", dir);
  char *text = read_file(path, NULL);
  if (text == NULL) {
    fprintf(stderr, "pipeline_stats: no %s (run the dump layer first)\n", path);
    exit(1);
  }
  uint32_t next = 0;
  INSTANCE_FN(vkEnumerateDeviceExtensionProperties)(gpu, NULL, &next, NULL);
  VkExtensionProperties *props = calloc(next, sizeof(*props));
  INSTANCE_FN(vkEnumerateDeviceExtensionProperties)(gpu, NULL, &next, props);
  const char *exec_ext = VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME;
  if (!has_extension(props, next, exec_ext)) {
    fprintf(stderr, "pipeline_stats: this device has no %s\n", exec_ext);
    exit(2);
  }
  PFN_vkGetPhysicalDeviceFeatures2 get_features = INSTANCE_FN(vkGetPhysicalDeviceFeatures2);
  const char **exts = calloc(256, sizeof(char *));
  uint32_t ext_count = 0;
  Feature features[64];
  int feature_count = 0, has_exec = 0;
  for (char *line = strtok(text, "\n"); line != NULL; line = strtok(NULL, "\n")) {
    char copy[8192];
    snprintf(copy, sizeof(copy), "%s", line);
    char *f[4];
    int nf = split_tabs(copy, f, 4);
    if (strcmp(f[0], "ext") == 0 && nf >= 2 && ext_count < 255) {
      if (has_extension(props, next, f[1])) {
        exts[ext_count++] = strdup(f[1]);
      } else {
        printf("note: this device has no %s\n", f[1]);
      }
    } else if ((strcmp(f[0], "features") == 0 || strcmp(f[0], "unknown") == 0) &&
               feature_count < 63) {
      VkStructureType s = (VkStructureType)atoi(f[1]);
      size_t size = ss_feature_struct_size(s);
      /* Unknown structs: enable what the device supports of them. */
      size_t buffer = size != 0 ? size : 1024;
      unsigned char *enabled = calloc(1, buffer), *supported = calloc(1, buffer);
      ((VkBaseOutStructure *)supported)->sType = s;
      VkPhysicalDeviceFeatures2 query = {VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, NULL, {0}};
      if (s != VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2) query.pNext = supported;
      get_features(gpu, &query);
      if (s == VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2) memcpy(supported, &query, size);
      if (size != 0 && nf >= 3) {
        parse_hex(f[2], enabled + sizeof(VkBaseOutStructure), size - sizeof(VkBaseOutStructure));
        and_bools(enabled, supported, size);
      } else {
        memcpy(enabled, supported, buffer);
      }
      ((VkBaseOutStructure *)enabled)->sType = s;
      ((VkBaseOutStructure *)enabled)->pNext = NULL;
      features[feature_count++] = (Feature){(VkBaseOutStructure *)enabled, buffer};
      free(supported);
      has_exec |=
          s == VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR;
    }
  }
  free(text);
  int ext_listed = 0;
  for (uint32_t i = 0; i < ext_count; i++) ext_listed |= strcmp(exts[i], exec_ext) == 0;
  if (!ext_listed) exts[ext_count++] = exec_ext;
  VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR exec_features = {
      VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR, NULL, VK_TRUE};
  void *chain = has_exec ? NULL : &exec_features;
  for (int i = 0; i < feature_count; i++) {
    if (features[i].data->sType ==
        VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR) {
      ((VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR *)features[i].data)
          ->pipelineExecutableInfo = VK_TRUE;
    }
    features[i].data->pNext = chain;
    chain = features[i].data;
  }

  uint32_t nq = 0;
  INSTANCE_FN(vkGetPhysicalDeviceQueueFamilyProperties)(gpu, &nq, NULL);
  VkQueueFamilyProperties *families = calloc(nq, sizeof(*families));
  INSTANCE_FN(vkGetPhysicalDeviceQueueFamilyProperties)(gpu, &nq, families);
  uint32_t family = 0;
  while (family < nq && !(families[family].queueFlags & VK_QUEUE_COMPUTE_BIT)) family++;
  free(families);
  float priority = 1.0f;
  VkDeviceQueueCreateInfo queue = {VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO, NULL, 0,
                                   family < nq ? family : 0, 1, &priority};
  VkDeviceCreateInfo info = {VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
  info.pNext = chain;
  info.queueCreateInfoCount = 1;
  info.pQueueCreateInfos = &queue;
  info.enabledExtensionCount = ext_count;
  info.ppEnabledExtensionNames = exts;
  VkDevice device;
  VkResult r = INSTANCE_FN(vkCreateDevice)(gpu, &info, NULL, &device);
  if (r != VK_SUCCESS) die("vkCreateDevice", r);
  PFN_vkGetDeviceProcAddr gdpa = INSTANCE_FN(vkGetDeviceProcAddr);
  fns->properties = (PFN_vkGetPipelineExecutablePropertiesKHR)gdpa(
      device, "vkGetPipelineExecutablePropertiesKHR");
  fns->statistics = (PFN_vkGetPipelineExecutableStatisticsKHR)gdpa(
      device, "vkGetPipelineExecutableStatisticsKHR");
  fns->representations = (PFN_vkGetPipelineExecutableInternalRepresentationsKHR)gdpa(
      device, "vkGetPipelineExecutableInternalRepresentationsKHR");
  free(props);
  return device;
}

/* Recreates pipeline-NNN.txt's pipeline and writes its report; 0 on success. */
static int replay(VkDevice device, const char *dir, const char *record,
                  const SsExecutableFns *fns) {
  PFN_vkGetDeviceProcAddr gdpa = INSTANCE_FN(vkGetDeviceProcAddr);
#define DEVICE_FN(name) ((PFN_##name)gdpa(device, #name))
  char path[4096];
  snprintf(path, sizeof(path), "%s/%s", dir, record);
  char *text = read_file(path, NULL);
  if (text == NULL) {
    printf("%s: cannot read\n", record);
    return 1;
  }
  char module_file[256] = "", entry[256] = "main";
  VkPipelineCreateFlags flags = 0;
  VkPipelineShaderStageCreateFlags stage_flags = 0;
  uint32_t subgroup = 0, set_count = 0, push_count = 0;
  int robust[4] = {-1, -1, -1, -1};
  VkDescriptorSetLayoutBinding bindings[8][64];
  uint32_t binding_count[8] = {0};
  VkPushConstantRange push[8];
  VkSpecializationMapEntry spec_entries[64];
  unsigned char spec_data[64 * 8];
  uint32_t spec_count = 0, spec_size = 0;
  for (char *line = strtok(text, "\n"); line != NULL; line = strtok(NULL, "\n")) {
    char *f[8];
    int nf = split_tabs(line, f, 8);
    if (nf < 2) continue;
    if (strcmp(f[0], "module") == 0) {
      snprintf(module_file, sizeof(module_file), "%s", f[1]);
    } else if (strcmp(f[0], "entry") == 0) {
      snprintf(entry, sizeof(entry), "%s", f[1]);
    } else if (strcmp(f[0], "flags") == 0) {
      flags = (VkPipelineCreateFlags)strtoul(f[1], NULL, 0);
    } else if (strcmp(f[0], "stage_flags") == 0) {
      stage_flags = (VkPipelineShaderStageCreateFlags)strtoul(f[1], NULL, 0);
    } else if (strcmp(f[0], "required_subgroup_size") == 0) {
      subgroup = (uint32_t)strtoul(f[1], NULL, 0);
    } else if (strcmp(f[0], "robustness") == 0 && nf >= 5) {
      for (int i = 0; i < 4; i++) robust[i] = atoi(f[1 + i]);
    } else if (strcmp(f[0], "set") == 0) {
      uint32_t s = (uint32_t)atoi(f[1]);
      if (s < 8 && s + 1 > set_count) set_count = s + 1;
    } else if (strcmp(f[0], "binding") == 0 && nf >= 6) {
      uint32_t s = (uint32_t)atoi(f[1]);
      if (s >= 8 || binding_count[s] >= 64) continue;
      bindings[s][binding_count[s]++] = (VkDescriptorSetLayoutBinding){
          (uint32_t)atoi(f[2]), (VkDescriptorType)atoi(f[3]), (uint32_t)atoi(f[4]),
          (VkShaderStageFlags)strtoul(f[5], NULL, 0), NULL};
    } else if (strcmp(f[0], "push") == 0 && nf >= 4 && push_count < 8) {
      push[push_count++] = (VkPushConstantRange){(VkShaderStageFlags)strtoul(f[3], NULL, 0),
                                                 (uint32_t)atoi(f[1]), (uint32_t)atoi(f[2])};
    } else if (strcmp(f[0], "spec") == 0 && nf >= 3 && spec_count < 64) {
      uint32_t size = (uint32_t)(strlen(f[2]) / 2);
      if (spec_size + size > sizeof(spec_data)) continue;
      parse_hex(f[2], spec_data + spec_size, size);
      spec_entries[spec_count++] =
          (VkSpecializationMapEntry){(uint32_t)atoi(f[1]), spec_size, size};
      spec_size += size;
    }
  }
  free(text);
  size_t code_size = 0;
  snprintf(path, sizeof(path), "%s/%s", dir, module_file);
  char *code = read_file(path, &code_size);
  if (code == NULL) {
    printf("%s: no module %s\n", record, module_file);
    return 1;
  }
  VkShaderModuleCreateInfo module_info = {VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO, NULL, 0,
                                          code_size, (const uint32_t *)code};
  VkShaderModule module;
  VkResult r = DEVICE_FN(vkCreateShaderModule)(device, &module_info, NULL, &module);
  free(code);
  if (r != VK_SUCCESS) {
    printf("%s: vkCreateShaderModule failed (%d)\n", record, (int)r);
    return 1;
  }
  VkDescriptorSetLayout sets[8];
  for (uint32_t s = 0; s < set_count; s++) {
    VkDescriptorSetLayoutCreateInfo set_info = {VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                                                NULL, 0, binding_count[s], bindings[s]};
    r = DEVICE_FN(vkCreateDescriptorSetLayout)(device, &set_info, NULL, &sets[s]);
    if (r != VK_SUCCESS) die("vkCreateDescriptorSetLayout", r);
  }
  VkPipelineLayoutCreateInfo layout_info = {VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO, NULL, 0,
                                            set_count, sets, push_count, push};
  VkPipelineLayout layout;
  r = DEVICE_FN(vkCreatePipelineLayout)(device, &layout_info, NULL, &layout);
  if (r != VK_SUCCESS) die("vkCreatePipelineLayout", r);

  VkPipelineShaderStageRequiredSubgroupSizeCreateInfo subgroup_info = {
      VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_REQUIRED_SUBGROUP_SIZE_CREATE_INFO, NULL, subgroup};
  VkSpecializationInfo spec = {spec_count, spec_entries, spec_size, spec_data};
  VkComputePipelineCreateInfo info = {VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO};
  info.flags = flags | VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR |
               VK_PIPELINE_CREATE_CAPTURE_INTERNAL_REPRESENTATIONS_BIT_KHR;
  info.stage = (VkPipelineShaderStageCreateInfo){
      VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO, subgroup ? &subgroup_info : NULL,
      stage_flags, VK_SHADER_STAGE_COMPUTE_BIT, module, entry, spec_count ? &spec : NULL};
  VkPipelineRobustnessCreateInfoEXT robustness = {
      VK_STRUCTURE_TYPE_PIPELINE_ROBUSTNESS_CREATE_INFO_EXT, NULL,
      (VkPipelineRobustnessBufferBehaviorEXT)robust[0],
      (VkPipelineRobustnessBufferBehaviorEXT)robust[1],
      (VkPipelineRobustnessBufferBehaviorEXT)robust[2],
      (VkPipelineRobustnessImageBehaviorEXT)robust[3]};
  if (robust[0] >= 0) info.pNext = &robustness;
  info.layout = layout;
  VkPipeline pipeline;
  r = DEVICE_FN(vkCreateComputePipelines)(device, VK_NULL_HANDLE, 1, &info, NULL, &pipeline);
  if (r != VK_SUCCESS) {
    printf("%s: vkCreateComputePipelines failed (%d)\n", record, (int)r);
    return 1;
  }
  char base[256], out_path[4096], prefix[4096];
  snprintf(base, sizeof(base), "%s", record);
  char *dot = strrchr(base, '.');
  if (dot != NULL) *dot = 0;
  snprintf(out_path, sizeof(out_path), "%s/%s.replay.stats", dir, base);
  snprintf(prefix, sizeof(prefix), "%s/%s.replay", dir, base);
  FILE *f = fopen(out_path, "w");
  if (f == NULL) {
    printf("%s: cannot write %s\n", record, out_path);
    return 1;
  }
  int n = ss_write_report(f, device, pipeline, fns, prefix);
  fclose(f);
  printf("%s: %s, %d executable(s) -> %s.replay.stats\n", record, module_file, n, base);
  DEVICE_FN(vkDestroyPipeline)(device, pipeline, NULL);
  DEVICE_FN(vkDestroyPipelineLayout)(device, layout, NULL);
  for (uint32_t s = 0; s < set_count; s++) {
    DEVICE_FN(vkDestroyDescriptorSetLayout)(device, sets[s], NULL);
  }
  DEVICE_FN(vkDestroyShaderModule)(device, module, NULL);
#undef DEVICE_FN
  return n > 0 ? 0 : 1;
}

static int is_record(const char *name) {
  size_t n = strlen(name);
  return strncmp(name, "pipeline-", 9) == 0 && n > 13 && strcmp(name + n - 4, ".txt") == 0 &&
         strchr(name + 9, '.') == name + n - 4;
}

static int compare_names(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

#include <dirent.h>

int main(int argc, char **argv) {
  int gpu_index = -1, list = 0, first = 1;
  for (; first < argc && strncmp(argv[first], "--", 2) == 0; first++) {
    if (strcmp(argv[first], "--gpu") == 0 && first + 1 < argc) {
      gpu_index = atoi(argv[++first]);
    } else if (strcmp(argv[first], "--list") == 0) {
      list = 1;
    } else {
      fprintf(stderr, "usage: pipeline_stats [--gpu N] [--list] DUMP_DIR [pipeline-NNN.txt ...]\n");
      return 2;
    }
  }
  if (first >= argc && !list) {
    fprintf(stderr, "usage: pipeline_stats [--gpu N] [--list] DUMP_DIR [pipeline-NNN.txt ...]\n");
    return 2;
  }
  void *lib = dlopen("libvulkan.so.1", RTLD_NOW);
  if (lib == NULL) {
    fprintf(stderr, "pipeline_stats: cannot load libvulkan.so.1: %s\n", dlerror());
    return 1;
  }
  gipa = (PFN_vkGetInstanceProcAddr)dlsym(lib, "vkGetInstanceProcAddr");
  VkApplicationInfo app = {VK_STRUCTURE_TYPE_APPLICATION_INFO, NULL, "pipeline_stats", 1, NULL, 0,
                           VK_API_VERSION_1_3};
  VkInstanceCreateInfo instance_info = {VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, NULL, 0, &app};
  VkResult r = ((PFN_vkCreateInstance)gipa(NULL, "vkCreateInstance"))(&instance_info, NULL,
                                                                        &instance);
  if (r != VK_SUCCESS) die("vkCreateInstance", r);

  const char *dir = list ? NULL : argv[first];
  char ids[32] = "";
  if (dir != NULL) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/device.txt", dir);
    char *text = read_file(path, NULL);
    char *f[6];
    if (text != NULL && strncmp(text, "device\t", 7) == 0 && split_tabs(text, f, 6) >= 4) {
      snprintf(ids, sizeof(ids), "%s\t%s", f[2], f[3]);
    }
    free(text);
  }
  VkPhysicalDevice gpu = pick_gpu(gpu_index, list, ids[0] ? ids : NULL);
  VkPhysicalDeviceProperties p;
  INSTANCE_FN(vkGetPhysicalDeviceProperties)(gpu, &p);
  printf("replaying on %s\n", p.deviceName);
  SsExecutableFns fns;
  VkDevice device = make_device(gpu, dir, &fns);

  char **records = NULL;
  int count = 0;
  if (first + 1 < argc) {
    records = argv + first + 1;
    count = argc - first - 1;
  } else {
    DIR *d = opendir(dir);
    struct dirent *e;
    records = calloc(4096, sizeof(char *));
    while (d != NULL && (e = readdir(d)) != NULL && count < 4096) {
      if (is_record(e->d_name)) records[count++] = strdup(e->d_name);
    }
    if (d != NULL) closedir(d);
    qsort(records, count, sizeof(char *), compare_names);
  }
  int failed = 0;
  for (int i = 0; i < count; i++) failed += replay(device, dir, records[i], &fns);
  ((PFN_vkDestroyDevice)INSTANCE_FN(vkGetDeviceProcAddr)(device, "vkDestroyDevice"))(device, NULL);
  INSTANCE_FN(vkDestroyInstance)(instance, NULL);
  printf("%d pipeline(s), %d failed\n", count, failed);
  return failed ? 1 : 0;
}
