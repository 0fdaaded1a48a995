/*
 * Shared by the SPIR-V dump layer (dump_layer.c) and the replay tool
 * (pipeline_stats.c): the feature structs a device create info may chain,
 * and the writer of a pipeline's VK_KHR_pipeline_executable_properties
 * report. Both are plain C99 against the Vulkan headers shipped beside them.
 *
 * Report format (one record per line, tab-separated, read by
 * benchmarks/shader_stats.ts):
 *   executable <i> <name> <description> <stages hex> <subgroup size>
 *   stat <i> <name> <value> <description>
 *   ir <i> <k> <name> <bytes> <text 0|1> <file or -> <description>
 *   irline <i> <k> <first lines of a text representation>
 */
#ifndef SHADER_STATS_COMMON_H_
#define SHADER_STATS_COMMON_H_

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vulkan/vulkan.h>

/* Newer than the 1.3.239 headers; Dawn chains it for subgroup matrices. */
#define SS_STYPE_COOPERATIVE_MATRIX_FEATURES_KHR ((VkStructureType)1000506000)
#define SS_STYPE_PIPELINE_CREATE_FLAGS_2_CREATE_INFO ((VkStructureType)1000470005)

typedef struct {
  VkStructureType sType;
  void *pNext;
  VkBool32 cooperativeMatrix;
  VkBool32 cooperativeMatrixRobustBufferAccess;
} SsCooperativeMatrixFeaturesKHR;

typedef struct {
  VkStructureType sType;
  const void *pNext;
  uint64_t flags;
} SsPipelineCreateFlags2CreateInfo;

/* First lines of a text representation copied into the report. */
#define SS_IR_HEAD_LINES 12

/*
 * Byte size of a feature struct Dawn may chain into VkDeviceCreateInfo, 0
 * if unknown (the replay then enables what the device supports of it).
 */
static size_t ss_feature_struct_size(VkStructureType s) {
  switch ((int)s) {
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2:
      return sizeof(VkPhysicalDeviceFeatures2);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES:
      return sizeof(VkPhysicalDeviceVulkan11Features);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES:
      return sizeof(VkPhysicalDeviceVulkan12Features);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_3_FEATURES:
      return sizeof(VkPhysicalDeviceVulkan13Features);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_16BIT_STORAGE_FEATURES:
      return sizeof(VkPhysicalDevice16BitStorageFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_8BIT_STORAGE_FEATURES:
      return sizeof(VkPhysicalDevice8BitStorageFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES:
      return sizeof(VkPhysicalDeviceShaderFloat16Int8Features);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_FEATURES:
      return sizeof(VkPhysicalDeviceSubgroupSizeControlFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_ZERO_INITIALIZE_WORKGROUP_MEMORY_FEATURES:
      return sizeof(VkPhysicalDeviceZeroInitializeWorkgroupMemoryFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_MEMORY_MODEL_FEATURES:
      return sizeof(VkPhysicalDeviceVulkanMemoryModelFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_TIMELINE_SEMAPHORE_FEATURES:
      return sizeof(VkPhysicalDeviceTimelineSemaphoreFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_DEMOTE_TO_HELPER_INVOCATION_FEATURES:
      return sizeof(VkPhysicalDeviceShaderDemoteToHelperInvocationFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_ROBUSTNESS_2_FEATURES_EXT:
      return sizeof(VkPhysicalDeviceRobustness2FeaturesEXT);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_IMAGE_ROBUSTNESS_FEATURES:
      return sizeof(VkPhysicalDeviceImageRobustnessFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_INTEGER_DOT_PRODUCT_FEATURES:
      return sizeof(VkPhysicalDeviceShaderIntegerDotProductFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_SUBGROUP_UNIFORM_CONTROL_FLOW_FEATURES_KHR:
      return sizeof(VkPhysicalDeviceShaderSubgroupUniformControlFlowFeaturesKHR);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_SUBGROUP_EXTENDED_TYPES_FEATURES:
      return sizeof(VkPhysicalDeviceShaderSubgroupExtendedTypesFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SAMPLER_YCBCR_CONVERSION_FEATURES:
      return sizeof(VkPhysicalDeviceSamplerYcbcrConversionFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_DRAW_PARAMETERS_FEATURES:
      return sizeof(VkPhysicalDeviceShaderDrawParametersFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VARIABLE_POINTERS_FEATURES:
      return sizeof(VkPhysicalDeviceVariablePointersFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DESCRIPTOR_INDEXING_FEATURES:
      return sizeof(VkPhysicalDeviceDescriptorIndexingFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_BUFFER_DEVICE_ADDRESS_FEATURES:
      return sizeof(VkPhysicalDeviceBufferDeviceAddressFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SCALAR_BLOCK_LAYOUT_FEATURES:
      return sizeof(VkPhysicalDeviceScalarBlockLayoutFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_UNIFORM_BUFFER_STANDARD_LAYOUT_FEATURES:
      return sizeof(VkPhysicalDeviceUniformBufferStandardLayoutFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_HOST_QUERY_RESET_FEATURES:
      return sizeof(VkPhysicalDeviceHostQueryResetFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SYNCHRONIZATION_2_FEATURES:
      return sizeof(VkPhysicalDeviceSynchronization2Features);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_4_FEATURES:
      return sizeof(VkPhysicalDeviceMaintenance4Features);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DEPTH_CLIP_ENABLE_FEATURES_EXT:
      return sizeof(VkPhysicalDeviceDepthClipEnableFeaturesEXT);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_ROBUSTNESS_FEATURES_EXT:
      return sizeof(VkPhysicalDevicePipelineRobustnessFeaturesEXT);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DYNAMIC_RENDERING_FEATURES:
      return sizeof(VkPhysicalDeviceDynamicRenderingFeatures);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_EXTENDED_DYNAMIC_STATE_FEATURES_EXT:
      return sizeof(VkPhysicalDeviceExtendedDynamicStateFeaturesEXT);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_NV:
      return sizeof(VkPhysicalDeviceCooperativeMatrixFeaturesNV);
    case VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR:
      return sizeof(VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR);
    case SS_STYPE_COOPERATIVE_MATRIX_FEATURES_KHR:
      return sizeof(SsCooperativeMatrixFeaturesKHR);
    default:
      return 0;
  }
}

/* Copies `s` into `out` (at most n - 1 chars) with tabs and newlines as spaces. */
static void ss_clean(char *out, size_t n, const char *s) {
  size_t i = 0;
  for (; s != NULL && s[i] != 0 && i + 1 < n; i++) {
    out[i] = (s[i] == '\t' || s[i] == '\n' || s[i] == '\r') ? ' ' : s[i];
  }
  out[i] = 0;
}

typedef struct {
  PFN_vkGetPipelineExecutablePropertiesKHR properties;
  PFN_vkGetPipelineExecutableStatisticsKHR statistics;
  PFN_vkGetPipelineExecutableInternalRepresentationsKHR representations;
} SsExecutableFns;

static void ss_write_stat_value(FILE *f, const VkPipelineExecutableStatisticKHR *s) {
  switch (s->format) {
    case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_BOOL32_KHR:
      fprintf(f, "%s", s->value.b32 ? "true" : "false");
      break;
    case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_INT64_KHR:
      fprintf(f, "%lld", (long long)s->value.i64);
      break;
    case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_UINT64_KHR:
      fprintf(f, "%llu", (unsigned long long)s->value.u64);
      break;
    case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_FLOAT64_KHR:
      fprintf(f, "%g", s->value.f64);
      break;
    default:
      fprintf(f, "?");
  }
}

/* Writes a text representation's first SS_IR_HEAD_LINES lines as irline records. */
static void ss_write_ir_head(FILE *f, uint32_t exe, uint32_t k, const char *text, size_t bytes) {
  size_t pos = 0;
  for (int line = 0; line < SS_IR_HEAD_LINES && pos < bytes && text[pos] != 0; line++) {
    size_t end = pos;
    while (end < bytes && text[end] != 0 && text[end] != '\n') end++;
    char buf[240];
    size_t len = end - pos < sizeof(buf) - 1 ? end - pos : sizeof(buf) - 1;
    memcpy(buf, text + pos, len);
    buf[len] = 0;
    char clean[240];
    ss_clean(clean, sizeof(clean), buf);
    fprintf(f, "irline\t%u\t%u\t%s\n", exe, k, clean);
    pos = end + 1;
  }
}

/*
 * Writes the report of `pipeline` to `f`; each internal representation goes
 * whole to `<ir_prefix>.e<i>.r<k>.txt` (or .bin). Returns the executables'
 * count, or -1 if the driver reported none.
 */
static int ss_write_report(FILE *f, VkDevice device, VkPipeline pipeline,
                           const SsExecutableFns *fns, const char *ir_prefix) {
  VkPipelineInfoKHR info = {VK_STRUCTURE_TYPE_PIPELINE_INFO_KHR, NULL, pipeline};
  uint32_t n = 0;
  if (fns->properties(device, &info, &n, NULL) != VK_SUCCESS || n == 0) {
    fprintf(f, "error\tno pipeline executables reported\n");
    return -1;
  }
  VkPipelineExecutablePropertiesKHR *props = calloc(n, sizeof(*props));
  for (uint32_t i = 0; i < n; i++) {
    props[i].sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_PROPERTIES_KHR;
  }
  fns->properties(device, &info, &n, props);
  for (uint32_t i = 0; i < n; i++) {
    char name[VK_MAX_DESCRIPTION_SIZE], desc[VK_MAX_DESCRIPTION_SIZE];
    ss_clean(name, sizeof(name), props[i].name);
    ss_clean(desc, sizeof(desc), props[i].description);
    fprintf(f, "executable\t%u\t%s\t%s\t0x%x\t%u\n", i, name, desc, (unsigned)props[i].stages,
            props[i].subgroupSize);
    VkPipelineExecutableInfoKHR exe = {VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_INFO_KHR, NULL,
                                       pipeline, i};
    uint32_t ns = 0;
    if (fns->statistics(device, &exe, &ns, NULL) == VK_SUCCESS && ns > 0) {
      VkPipelineExecutableStatisticKHR *stats = calloc(ns, sizeof(*stats));
      for (uint32_t s = 0; s < ns; s++) {
        stats[s].sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_STATISTIC_KHR;
      }
      fns->statistics(device, &exe, &ns, stats);
      for (uint32_t s = 0; s < ns; s++) {
        ss_clean(name, sizeof(name), stats[s].name);
        ss_clean(desc, sizeof(desc), stats[s].description);
        fprintf(f, "stat\t%u\t%s\t", i, name);
        ss_write_stat_value(f, &stats[s]);
        fprintf(f, "\t%s\n", desc);
      }
      free(stats);
    }
    uint32_t nr = 0;
    if (fns->representations == NULL ||
        fns->representations(device, &exe, &nr, NULL) != VK_SUCCESS || nr == 0) {
      continue;
    }
    VkPipelineExecutableInternalRepresentationKHR *reps = calloc(nr, sizeof(*reps));
    for (uint32_t k = 0; k < nr; k++) {
      reps[k].sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_INTERNAL_REPRESENTATION_KHR;
    }
    fns->representations(device, &exe, &nr, reps); /* sizes */
    for (uint32_t k = 0; k < nr; k++) reps[k].pData = calloc(1, reps[k].dataSize + 1);
    fns->representations(device, &exe, &nr, reps); /* data */
    for (uint32_t k = 0; k < nr; k++) {
      char path[4200] = "-";
      if (ir_prefix != NULL) {
        snprintf(path, sizeof(path), "%s.e%u.r%u.%s", ir_prefix, i, k,
                 reps[k].isText ? "txt" : "bin");
        FILE *o = fopen(path, "wb");
        if (o != NULL) {
          /* Text representations end in a NUL that is not part of the text. */
          size_t bytes = reps[k].dataSize;
          if (reps[k].isText && bytes > 0 && ((char *)reps[k].pData)[bytes - 1] == 0) bytes--;
          fwrite(reps[k].pData, 1, bytes, o);
          fclose(o);
        }
      }
      const char *base = strrchr(path, '/');
      ss_clean(name, sizeof(name), reps[k].name);
      ss_clean(desc, sizeof(desc), reps[k].description);
      fprintf(f, "ir\t%u\t%u\t%s\t%zu\t%d\t%s\t%s\n", i, k, name, reps[k].dataSize,
              reps[k].isText ? 1 : 0, base != NULL ? base + 1 : path, desc);
      if (reps[k].isText) ss_write_ir_head(f, i, k, reps[k].pData, reps[k].dataSize);
      free(reps[k].pData);
    }
    free(reps);
  }
  free(props);
  return (int)n;
}

#endif /* SHADER_STATS_COMMON_H_ */
