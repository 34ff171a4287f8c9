/// @file tensor.c
/// Tensor views: construction, transposition, narrowing, validation, and the
/// dtype / layout / method name tables.
#include <stdlib.h>

#include "internal.h"

size_t moe_dtype_size(moe_dtype t) {
  switch (t) {
  case MOE_F32: return 4;
  case MOE_BF16: return 2;
  case MOE_F16: return 2;
  case MOE_I32: return 4;
  case MOE_I64: return 8;
  case MOE_F64: return 8;
  }
  return 0;
}

/// names[v] for an enum value v in [0, n), else "?".
static const char *moe_name_of(int v, const char *const *names, int n) {
  return v >= 0 && v < n ? names[v] : "?";
}

const char *moe_dtype_name(moe_dtype t) {
  static const char *const names[] = {"f32", "bf16", "f16",
                                      "i32", "i64",  "f64"};
  return moe_name_of((int)t, names, 6);
}

const char *moe_gmm_method_name(moe_gmm_method m) {
  static const char *const names[] = {"auto", "grouped", "loop"};
  return moe_name_of((int)m, names, 3);
}

const char *moe_memory_policy_name(moe_memory_policy m) {
  static const char *const names[] = {"balanced", "lean", "fast"};
  return moe_name_of((int)m, names, 3);
}

const char *moe_layout_name(moe_layout l) {
  static const char *const names[] = {"out_in", "in_out", "strided"};
  return moe_name_of((int)l, names, 3);
}

moe_layout moe_weight_layout(const moe_tensor *w) {
  if (w->ndim != 3) return MOE_LAYOUT_STRIDED;
  if (w->stride[2] == 1 || w->shape[2] == 1) return MOE_LAYOUT_OUT_IN;
  if (w->stride[1] == 1 || w->shape[1] == 1) return MOE_LAYOUT_IN_OUT;
  return MOE_LAYOUT_STRIDED;
}

bool moe_weight_layout_fits(const moe_tensor *w, moe_layout layout) {
  if (w->ndim != 3) return false;
  switch (layout) {
  case MOE_LAYOUT_OUT_IN: return w->stride[2] == 1 || w->shape[2] <= 1;
  case MOE_LAYOUT_IN_OUT: return w->stride[1] == 1 || w->shape[1] <= 1;
  case MOE_LAYOUT_STRIDED: return true; /* the strided path reads any */
  }
  return false;
}

moe_tensor moe_tensor_make(void *data, moe_dtype dtype, int ndim,
                           const int64_t *shape) {
  moe_tensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.dtype = dtype;
  t.device.type = MOE_DEVICE_CPU;
  if (ndim < 0 || ndim > MOE_MAX_DIMS || (ndim > 0 && !shape)) return t;
  int64_t s = 1;
  for (int d = ndim - 1; d >= 0; d--) {
    t.shape[d] = shape[d];
    t.stride[d] = s;
    /* The element count must stay an int64: an overflowing shape gives
       the absent view (ndim 0), which every call rejects. */
    if (!moe_mul_ok(s, shape[d] > 0 ? shape[d] : 1, &s)) {
      memset(t.shape, 0, sizeof t.shape);
      memset(t.stride, 0, sizeof t.stride);
      return t;
    }
  }
  t.ndim = ndim;
  return t;
}

int64_t moe_tensor_numel(const moe_tensor *t) {
  if (!t || t->ndim <= 0 || t->ndim > MOE_MAX_DIMS) return 0;
  int64_t n = 1;
  bool over = false;
  for (int d = 0; d < t->ndim; d++) {
    if (t->shape[d] <= 0) return 0; /* empty, or invalid (negative) */
    if (!over && !moe_mul_ok(n, t->shape[d], &n)) over = true;
  }
  return over ? INT64_MAX : n;
}

moe_status moe_tensor_transpose(const moe_tensor *in, int d0, int d1,
                                moe_tensor *out) {
  if (!in || !out)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_tensor_transpose: in and out must not be NULL");
  if (d0 < 0 || d1 < 0 || d0 >= in->ndim || d1 >= in->ndim)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_tensor_transpose: dims (%d, %d) out of range for a "
                     "%d-d tensor",
                     d0, d1, in->ndim);
  moe_tensor t = *in;
  t.shape[d0] = in->shape[d1];
  t.shape[d1] = in->shape[d0];
  t.stride[d0] = in->stride[d1];
  t.stride[d1] = in->stride[d0];
  *out = t;
  return MOE_SUCCESS;
}

moe_status moe_tensor_narrow(const moe_tensor *in, int dim, int64_t start,
                             int64_t len, moe_tensor *out) {
  if (!in || !out)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_tensor_narrow: in and out must not be NULL");
  if (dim < 0 || dim >= in->ndim)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_tensor_narrow: dim %d out of range for a %d-d "
                     "tensor",
                     dim, in->ndim);
  if (start < 0 || len < 0 || start > in->shape[dim] ||
      len > in->shape[dim] - start)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_tensor_narrow: [%lld, %lld) outside dim %d of size "
                     "%lld",
                     (long long)start, (long long)(start + len), dim,
                     (long long)in->shape[dim]);
  moe_tensor t = *in;
  t.shape[dim] = len;
  if (t.data)
    t.data = (char *)t.data +
             (size_t)(start * in->stride[dim]) * moe_dtype_size(in->dtype);
  *out = t;
  return MOE_SUCCESS;
}

bool moe_tensor_rows_contiguous(const moe_tensor *t) {
  return t->ndim == 2 && (t->stride[1] == 1 || t->shape[1] <= 1) &&
         (t->stride[0] == t->shape[1] || t->shape[0] <= 1);
}

moe_status moe_check_tensor(const moe_tensor *t, const char *name, int ndim,
                            const int64_t *shape, int dtype,
                            const moe_device *dev) {
  if (t->ndim == 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: tensor is missing", name);
  if (t->ndim != ndim)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: expected %d dimensions, got %d", name, ndim, t->ndim);
  for (int d = 0; d < ndim; d++) {
    if (t->shape[d] < 0)
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: negative size %lld in dim %d", name,
                       (long long)t->shape[d], d);
    if (shape && shape[d] >= 0 && t->shape[d] != shape[d])
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: dim %d has size %lld, expected %lld", name, d,
                       (long long)t->shape[d], (long long)shape[d]);
    if (t->stride[d] < 0)
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: negative stride %lld in dim %d", name,
                       (long long)t->stride[d], d);
  }
  if (dtype >= 0 && (int)t->dtype != dtype)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: dtype %s, expected %s",
                     name, moe_dtype_name(t->dtype),
                     moe_dtype_name((moe_dtype)dtype));
  if (dtype < 0 && t->dtype != MOE_F32 && t->dtype != MOE_BF16)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: dtype %s, expected f32 or bf16", name,
                     moe_dtype_name(t->dtype));
  if (dev && (t->device.type != dev->type || t->device.index != dev->index))
    return moe_error(
        MOE_ERR_INVALID_ARGUMENT, "%s: on device %d:%d, the plan runs on %d:%d",
        name, (int)t->device.type, t->device.index, (int)dev->type, dev->index);
  /* The last element's offset and the byte span must fit the integer
     types every index is computed in. */
  int64_t n = moe_tensor_numel(t), last = 0, x;
  size_t es = moe_dtype_size(t->dtype);
  for (int d = 0; d < ndim && n > 0; d++)
    if (!moe_mul_ok(t->shape[d] - 1, t->stride[d], &x) ||
        !moe_add_ok(last, x, &last))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: shape and strides span more than 2^63 elements",
                       name);
  if (n > 0 && (!moe_add_ok(last, 1, &x) || !moe_mul_ok(x, (int64_t)es, &x) ||
                n == INT64_MAX || !moe_mul_ok(n, (int64_t)es, &x)))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: shape and strides span more than 2^63 bytes", name);
  if (!t->data && n > 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: data is NULL", name);
  MOE_TRY(moe_check_align(t->data, es, name));
  return MOE_SUCCESS;
}

moe_status moe_check_align(const void *p, size_t align, const char *name) {
  if (align > 1 && ((uintptr_t)p % align) != 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: pointer %p is not aligned to %zu bytes; libmoe "
                     "needs tensor data aligned to its element size and "
                     "workspace / saved buffers aligned to %d bytes",
                     name, p, align, MOE_BUFFER_ALIGN);
  return MOE_SUCCESS;
}

void *moe_alloc(size_t bytes, const char *what) {
  if (bytes == 0) bytes = 64;
  void *p = NULL;
  if (posix_memalign(&p, 64, moe_align64(bytes)) != 0) {
    moe_error(MOE_ERR_OUT_OF_MEMORY,
              "out of memory allocating %zu bytes for %s", bytes, what);
    return NULL;
  }
  return p;
}

void moe_free(void *p) { free(p); }
