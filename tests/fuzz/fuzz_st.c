/// @file fuzz_st.c
/// libFuzzer target: the safetensors reader (moe_st_open and every query)
/// on arbitrary bytes, and the writer's gather of every view it returns.
/// Built and run by tests/fuzz/run.sh with ASan and UBSan.
#include <stdint.h>
#include <string.h>

#include "fuzz_common.h"
#include "moe_io.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char path[64];
  int fd = fuzz_memfile(data, size, path, sizeof path);
  if (fd < 0) return 0;
  moe_st_file *f = NULL;
  if (moe_st_open(path, &f) == MOE_SUCCESS) {
    moe_st_writer *w = NULL;
    moe_st_writer_create(&w);
    int64_t n = moe_st_count(f);
    volatile uint8_t sink = 0;
    for (int64_t i = 0; i < n; i++) {
      const char *name = moe_st_name(f, i);
      moe_tensor v;
      if (!name || !moe_st_has(f, name) ||
          moe_st_get(f, name, &v) != MOE_SUCCESS)
        __builtin_trap(); /* a listed tensor must be retrievable */
      int64_t numel = moe_tensor_numel(&v);
      size_t bytes = (size_t)numel * moe_dtype_size(v.dtype);
      const uint8_t *p = v.data;
      for (size_t b = 0; b < bytes; b++) /* every byte must be mapped */
        sink ^= p[b];
      if (w) moe_st_writer_add(w, name, &v);
    }
    (void)sink;
    static const char *const keys[] = {"top_k", "norm_topk_prob",
                                       "gate_up_layout", "format", ""};
    for (size_t k = 0; k < sizeof keys / sizeof *keys; k++)
      (void)moe_st_metadata(f, keys[k]);
    moe_st_writer_destroy(w);
    moe_st_close(f);
  }
  close(fd);
  return 0;
}
