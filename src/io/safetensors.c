/// @file safetensors.c
/// safetensors I/O: the validating read-only mmap reader (moe_st_open and its
/// queries) and the atomic writer (moe_st_writer_*). The JSON header is
/// parsed by cJSON; this file owns every check between the raw bytes and a
/// moe_tensor view, and every step from caller tensors to a renamed file.
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "internal.h"
#include "moe_io.h"

/// Largest header accepted (the reference implementation's limit). It bounds
/// the memory a hostile file can make cJSON allocate.
#define ST_HEADER_MAX ((uint64_t)100 * 1000 * 1000)
/// JSON numbers are doubles; integers at or past 2^53 are not exact.
#define ST_INT_LIMIT 9007199254740992.0
#define ST_METADATA_KEY "__metadata__"

static const struct {
  const char *name;
  moe_dtype dtype;
} st_dtype_table[] = {
    {"F32", MOE_F32}, {"BF16", MOE_BF16}, {"F16", MOE_F16},
    {"I32", MOE_I32}, {"I64", MOE_I64},   {"F64", MOE_F64},
};
#define ST_NUM_DTYPES (sizeof st_dtype_table / sizeof *st_dtype_table)

static bool st_dtype_parse(const char *s, moe_dtype *out) {
  for (size_t i = 0; i < ST_NUM_DTYPES; i++)
    if (strcmp(s, st_dtype_table[i].name) == 0) {
      *out = st_dtype_table[i].dtype;
      return true;
    }
  return false;
}

static const char *st_dtype_str(moe_dtype t) {
  for (size_t i = 0; i < ST_NUM_DTYPES; i++)
    if (st_dtype_table[i].dtype == t) return st_dtype_table[i].name;
  return NULL;
}

/// True if [p, p+n) is well-formed UTF-8: no overlong forms, surrogates or
/// code points past U+10FFFF. On failure *bad is the offending offset.
static bool st_utf8_valid(const unsigned char *p, size_t n, size_t *bad) {
  size_t i = 0;
  while (i < n) {
    unsigned c = p[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t len;
    unsigned lo = 0x80, hi = 0xBF; // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0; // overlong
      if (c == 0xED) hi = 0x9F; // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90; // overlong
      if (c == 0xF4) hi = 0x8F; // past U+10FFFF
    } else {
      *bad = i;
      return false;
    }
    if (n - i < len || p[i + 1] < lo || p[i + 1] > hi) {
      *bad = i;
      return false;
    }
    for (size_t k = 2; k < len; k++)
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) {
        *bad = i;
        return false;
      }
    i += len;
  }
  return true;
}

/// cJSON accepts two things that JSON forbids and that would corrupt names:
/// raw control characters, and the escape \u0000, which it decodes into a NUL
/// that silently truncates the C string (so "a\u0000x" and "a\u0000y" would
/// both read as "a"). This byte scan - not a parser; cJSON still decides
/// what is valid JSON - rejects both. Returns NULL or the reason, with *at
/// the offset.
static const char *st_lex_check(const unsigned char *p, size_t n, size_t *at) {
  bool in_string = false;
  for (size_t i = 0; i < n; i++) {
    unsigned c = p[i];
    *at = i;
    if (!in_string) {
      if (c == '"')
        in_string = true;
      else if (c < 0x20 && c != '\t' && c != '\n' && c != '\r')
        return "has a control character";
      continue;
    }
    if (c < 0x20) return "has a raw control character inside a string";
    if (c == '"') {
      in_string = false;
    } else if (c == '\\' && i + 1 < n) {
      if (p[i + 1] == 'u' && n - i >= 6 && memcmp(p + i + 2, "0000", 4) == 0)
        return "has a string with an escaped NUL (\\u0000)";
      i++; // skip the escaped character (it may be a quote)
    }
  }
  return NULL;
}

/// If `item` is an integral JSON number in [0, 2^53), stores it and returns
/// true. Rejects fractions, negatives, infinities and inexact magnitudes.
static bool st_json_int(const cJSON *item, int64_t *out) {
  if (!cJSON_IsNumber(item)) return false;
  double v = item->valuedouble;
  if (!(v >= 0.0 && v < ST_INT_LIMIT)) return false; // also rejects NaN
  int64_t i = (int64_t)v;
  if ((double)i != v) return false;
  *out = i;
  return true;
}

/// Writes "[a, b, c]" into buf.
static void st_shape_str(const int64_t *shape, int ndim, char *buf, size_t n) {
  size_t used = 0;
  buf[0] = '\0';
  for (int d = 0; d <= ndim && used < n; d++) {
    int k;
    if (d == ndim)
      k = snprintf(buf + used, n - used, "]");
    else
      k = snprintf(buf + used, n - used, "%s%lld", d ? ", " : "[",
                   (long long)shape[d]);
    if (k < 0) return;
    used += (size_t)k;
  }
}

/* ---- reader ---------------------------------------------------------- */

/// One tensor of an open file; `name` points into the cJSON tree.
typedef struct st_entry {
  const char *name;
  moe_dtype dtype;
  int ndim;
  int64_t shape[MOE_MAX_DIMS];
  int64_t begin, end; ///< byte offsets into the data section
} st_entry;

/// A name sorted for duplicate detection and binary search: a tensor name
/// with its entry index, or a metadata key with its value.
typedef struct st_key {
  const char *name;
  const char *value;
  int64_t index;
} st_key;

typedef struct st_range {
  int64_t begin, end, index;
} st_range;

struct moe_st_file {
  char *path;
  unsigned char *map; ///< the whole file, PROT_READ, MAP_PRIVATE
  size_t map_size;
  unsigned char *data; ///< map + 8 + header length
  int64_t data_size;
  cJSON *root;       ///< owns every name, key and value string
  st_entry *entries; ///< file order
  int64_t count;
  st_key *by_name; ///< `count` tensor names, sorted
  st_key *meta;    ///< metadata keys, sorted
  int64_t meta_count;
};

static int st_key_cmp(const void *a, const void *b) {
  return strcmp(((const st_key *)a)->name, ((const st_key *)b)->name);
}

static int st_range_cmp(const void *a, const void *b) {
  const st_range *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return 0;
}

/// Sorts keys by name; returns a name that occurs twice, or NULL.
static const char *st_sort_keys(st_key *k, int64_t n) {
  if (n > 1) qsort(k, (size_t)n, sizeof *k, st_key_cmp);
  for (int64_t i = 1; i < n; i++)
    if (strcmp(k[i - 1].name, k[i].name) == 0) return k[i].name;
  return NULL;
}

static const st_key *st_find(const st_key *k, int64_t n, const char *name) {
  if (n <= 0) return NULL;
  st_key probe = {name, NULL, 0};
  return bsearch(&probe, k, (size_t)n, sizeof *k, st_key_cmp);
}

/// Allocates n elements of `size` bytes, checking the product.
static void *st_alloc_array(int64_t n, size_t size, const char *what) {
  int64_t bytes;
  if (!moe_mul_ok(n, (int64_t)size, &bytes)) {
    moe_error(MOE_ERR_OUT_OF_MEMORY, "%s: %lld elements overflow", what,
              (long long)n);
    return NULL;
  }
  return moe_alloc((size_t)bytes, what);
}

static char *st_strdup(const char *s, const char *what) {
  size_t n = strlen(s) + 1;
  char *c = moe_alloc(n, what);
  if (c) memcpy(c, s, n);
  return c;
}

static void st_file_free(moe_st_file *f) {
  if (f->map) munmap(f->map, f->map_size);
  cJSON_Delete(f->root);
  moe_free(f->entries);
  moe_free(f->by_name);
  moe_free(f->meta);
  moe_free(f->path);
  moe_free(f);
}

/// Opens and maps the file; rejects what is not a regular file of >= 8 bytes.
static moe_status st_map_file(moe_st_file *f) {
  const char *path = f->path;
  // O_NONBLOCK so that a FIFO cannot hang the open; no effect on files.
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    return moe_error(MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    return moe_error(MOE_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return moe_error(MOE_ERR_IO, "%s: %s, not a safetensors file", path,
                     S_ISDIR(st.st_mode) ? "is a directory"
                                         : "is not a regular file");
  }
  if (st.st_size < 8) {
    close(fd);
    return moe_error(MOE_ERR_FORMAT,
                     "%s: file is %lld bytes, too short to hold the 8-byte "
                     "header length",
                     path, (long long)st.st_size);
  }
#if SIZE_MAX < UINT64_MAX
  if ((uint64_t)st.st_size > SIZE_MAX) {
    close(fd);
    return moe_error(MOE_ERR_IO, "%s: %lld bytes do not fit the address space",
                     path, (long long)st.st_size);
  }
#endif
  size_t size = (size_t)st.st_size;
  // The mapping outlives the descriptor. If another process truncates the
  // file later, reading a view past the new end raises SIGBUS; safetensors
  // readers share this limitation of mmap.
  void *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close(fd);
  if (m == MAP_FAILED)
    return moe_error(MOE_ERR_IO, "%s: cannot mmap %zu bytes: %s", path, size,
                     strerror(e));
  f->map = m;
  f->map_size = size;
  return MOE_SUCCESS;
}

/// Reads the 8-byte length, checks the header bytes and parses them.
static moe_status st_parse_header(moe_st_file *f) {
  const char *path = f->path;
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--)
    n = (n << 8) | f->map[i];
  uint64_t room = (uint64_t)f->map_size - 8;
  if (n < 2)
    return moe_error(MOE_ERR_FORMAT,
                     "%s: header length %llu is too small for a JSON object",
                     path, (unsigned long long)n);
  if (n > ST_HEADER_MAX)
    return moe_error(MOE_ERR_FORMAT,
                     "%s: header length %llu exceeds the %llu-byte limit", path,
                     (unsigned long long)n, (unsigned long long)ST_HEADER_MAX);
  if (n > room)
    return moe_error(MOE_ERR_FORMAT,
                     "%s: header length %llu runs past the end of the file "
                     "(%llu bytes after the length)",
                     path, (unsigned long long)n, (unsigned long long)room);
  const unsigned char *hdr = f->map + 8;
  f->data = f->map + 8 + n;
  f->data_size = (int64_t)(room - n);

  size_t at = 0;
  const char *why = st_lex_check(hdr, (size_t)n, &at);
  if (!why && !st_utf8_valid(hdr, (size_t)n, &at)) why = "is not valid UTF-8";
  if (why)
    return moe_error(MOE_ERR_FORMAT, "%s: header %s (byte %zu)", path, why, at);

  // cJSON needs a NUL-terminated string; the mapping has none.
  char *text = moe_alloc((size_t)n + 1, "safetensors header");
  if (!text) return MOE_ERR_OUT_OF_MEMORY;
  memcpy(text, hdr, (size_t)n);
  text[n] = '\0';
  const char *end = NULL;
  // require_null_terminated: only whitespace (the format pads with spaces)
  // may follow the object.
  f->root = cJSON_ParseWithOpts(text, &end, 1);
  size_t pos = end ? (size_t)(end - text) : 0;
  moe_free(text);
  if (!f->root)
    return moe_error(MOE_ERR_FORMAT,
                     "%s: header is not valid JSON (error near byte %zu of "
                     "%llu)",
                     path, pos, (unsigned long long)n);
  if (!cJSON_IsObject(f->root))
    return moe_error(MOE_ERR_FORMAT, "%s: header is JSON but not an object",
                     path);
  return MOE_SUCCESS;
}

/// Validates `__metadata__`: an object of string values, keys unique.
static moe_status st_parse_metadata(moe_st_file *f, const cJSON *md) {
  const char *path = f->path;
  if (!cJSON_IsObject(md))
    return moe_error(MOE_ERR_FORMAT, "%s: %s is not a JSON object", path,
                     ST_METADATA_KEY);
  int64_t n = 0;
  const cJSON *it;
  cJSON_ArrayForEach(it, md) n++;
  f->meta = st_alloc_array(n, sizeof *f->meta, "safetensors metadata");
  if (!f->meta) return MOE_ERR_OUT_OF_MEMORY;
  n = 0;
  cJSON_ArrayForEach(it, md) {
    if (!cJSON_IsString(it) || !it->valuestring)
      return moe_error(MOE_ERR_FORMAT,
                       "%s: %s value of key '%s' is not a string", path,
                       ST_METADATA_KEY, it->string);
    f->meta[n].name = it->string;
    f->meta[n].value = it->valuestring;
    f->meta[n].index = n;
    n++;
  }
  f->meta_count = n;
  const char *dup = st_sort_keys(f->meta, n);
  if (dup)
    return moe_error(MOE_ERR_FORMAT, "%s: %s has key '%s' twice", path,
                     ST_METADATA_KEY, dup);
  return MOE_SUCCESS;
}

/// Validates one tensor entry against the data section.
static moe_status st_parse_entry(moe_st_file *f, const cJSON *item,
                                 st_entry *e) {
  const char *path = f->path, *name = item->string;
  e->name = name;
  if (name[0] == '\0')
    return moe_error(MOE_ERR_FORMAT, "%s: a tensor has an empty name", path);
  if (!cJSON_IsObject(item))
    return moe_error(MOE_ERR_FORMAT,
                     "%s: tensor '%s': entry is not a JSON object", path, name);
  // cJSON keeps duplicate keys; the lookups below would see only the first.
  int seen[3] = {0, 0, 0};
  static const char *const keys[3] = {"dtype", "shape", "data_offsets"};
  const cJSON *it;
  cJSON_ArrayForEach(it, item) {
    for (int k = 0; k < 3; k++)
      if (strcmp(it->string, keys[k]) == 0 && seen[k]++)
        return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s': key '%s' twice",
                         path, name, keys[k]);
  }

  const cJSON *dt = cJSON_GetObjectItemCaseSensitive(item, "dtype");
  if (!cJSON_IsString(dt) || !dt->valuestring)
    return moe_error(MOE_ERR_FORMAT,
                     "%s: tensor '%s': \"dtype\" is missing or not a string",
                     path, name);
  if (!st_dtype_parse(dt->valuestring, &e->dtype))
    return moe_error(MOE_ERR_FORMAT,
                     "%s: tensor '%s': unsupported dtype '%s' (supported: "
                     "F32, BF16, F16, I32, I64, F64)",
                     path, name, dt->valuestring);

  const cJSON *sh = cJSON_GetObjectItemCaseSensitive(item, "shape");
  if (!cJSON_IsArray(sh))
    return moe_error(MOE_ERR_FORMAT,
                     "%s: tensor '%s': \"shape\" is missing or not an array",
                     path, name);
  int ndim = 0;
  cJSON_ArrayForEach(it, sh) {
    if (ndim == MOE_MAX_DIMS)
      return moe_error(MOE_ERR_FORMAT,
                       "%s: tensor '%s': shape has %d dimensions, at most %d "
                       "are supported",
                       path, name, cJSON_GetArraySize(sh), MOE_MAX_DIMS);
    if (!st_json_int(it, &e->shape[ndim]))
      return moe_error(MOE_ERR_FORMAT,
                       "%s: tensor '%s': shape[%d] is not an integer in "
                       "[0, 2^53)",
                       path, name, ndim);
    ndim++;
  }
  if (ndim == 0)
    return moe_error(MOE_ERR_FORMAT,
                     "%s: tensor '%s': shape [] (a scalar): scalars are not "
                     "supported",
                     path, name);
  e->ndim = ndim;

  const cJSON *off = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
  if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
      !st_json_int(cJSON_GetArrayItem(off, 0), &e->begin) ||
      !st_json_int(cJSON_GetArrayItem(off, 1), &e->end))
    return moe_error(MOE_ERR_FORMAT,
                     "%s: tensor '%s': \"data_offsets\" must be [begin, end], "
                     "integers in [0, 2^53)",
                     path, name);
  if (e->begin > e->end)
    return moe_error(MOE_ERR_FORMAT,
                     "%s: tensor '%s': data_offsets begin %lld > end %lld",
                     path, name, (long long)e->begin, (long long)e->end);
  if (e->end > f->data_size)
    return moe_error(MOE_ERR_FORMAT,
                     "%s: tensor '%s': data_offsets end %lld is past the "
                     "%lld-byte data section (truncated file?)",
                     path, name, (long long)e->end, (long long)f->data_size);

  char shape[128];
  st_shape_str(e->shape, ndim, shape, sizeof shape);
  int64_t numel = 1, bytes;
  for (int d = 0; d < ndim; d++)
    if (!moe_mul_ok(numel, e->shape[d], &numel))
      return moe_error(MOE_ERR_FORMAT,
                       "%s: tensor '%s': element count of shape %s overflows "
                       "int64",
                       path, name, shape);
  if (!moe_mul_ok(numel, (int64_t)moe_dtype_size(e->dtype), &bytes))
    return moe_error(MOE_ERR_FORMAT,
                     "%s: tensor '%s': byte size of shape %s %s overflows "
                     "int64",
                     path, name, shape, dt->valuestring);
  if (bytes != e->end - e->begin)
    return moe_error(MOE_ERR_FORMAT,
                     "%s: tensor '%s': shape %s %s needs %lld bytes but "
                     "data_offsets [%lld, %lld] span %lld",
                     path, name, shape, dt->valuestring, (long long)bytes,
                     (long long)e->begin, (long long)e->end,
                     (long long)(e->end - e->begin));
  return MOE_SUCCESS;
}

/// Rejects byte ranges shared by two tensors. Empty tensors occupy no bytes
/// and cannot overlap anything.
static moe_status st_check_overlap(moe_st_file *f) {
  st_range *r = st_alloc_array(f->count, sizeof *r, "safetensors ranges");
  if (!r) return MOE_ERR_OUT_OF_MEMORY;
  int64_t n = 0;
  for (int64_t i = 0; i < f->count; i++)
    if (f->entries[i].end > f->entries[i].begin)
      r[n++] = (st_range){f->entries[i].begin, f->entries[i].end, i};
  if (n > 1) qsort(r, (size_t)n, sizeof *r, st_range_cmp);
  moe_status s = MOE_SUCCESS;
  for (int64_t i = 1; i < n; i++)
    if (r[i].begin < r[i - 1].end) {
      const st_entry *a = &f->entries[r[i - 1].index];
      const st_entry *b = &f->entries[r[i].index];
      s = moe_error(MOE_ERR_FORMAT,
                    "%s: tensors '%s' [%lld, %lld) and '%s' [%lld, %lld) "
                    "overlap",
                    f->path, a->name, (long long)a->begin, (long long)a->end,
                    b->name, (long long)b->begin, (long long)b->end);
      break;
    }
  moe_free(r);
  return s;
}

static moe_status st_open_impl(moe_st_file *f) {
  MOE_TRY(st_map_file(f));
  MOE_TRY(st_parse_header(f));

  int64_t n = 0;
  const cJSON *it, *md = NULL;
  cJSON_ArrayForEach(it, f->root) {
    if (strcmp(it->string, ST_METADATA_KEY) != 0) {
      n++;
    } else if (md) {
      return moe_error(MOE_ERR_FORMAT, "%s: %s appears twice", f->path,
                       ST_METADATA_KEY);
    } else {
      md = it;
    }
  }
  if (md) MOE_TRY(st_parse_metadata(f, md));

  f->entries = st_alloc_array(n, sizeof *f->entries, "safetensors entries");
  f->by_name = st_alloc_array(n, sizeof *f->by_name, "safetensors names");
  if (!f->entries || !f->by_name) return MOE_ERR_OUT_OF_MEMORY;
  memset(f->entries, 0, (size_t)n * sizeof *f->entries);
  cJSON_ArrayForEach(it, f->root) {
    if (it == md) continue;
    st_entry *e = &f->entries[f->count];
    MOE_TRY(st_parse_entry(f, it, e));
    f->by_name[f->count] = (st_key){e->name, NULL, f->count};
    f->count++;
  }
  const char *dup = st_sort_keys(f->by_name, f->count);
  if (dup)
    return moe_error(MOE_ERR_FORMAT, "%s: tensor '%s' appears twice", f->path,
                     dup);
  return st_check_overlap(f);
}

moe_status moe_st_open(const char *path, moe_st_file **file) {
  if (!file)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "moe_st_open: file is NULL");
  *file = NULL;
  if (!path)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "moe_st_open: path is NULL");
  moe_st_file *f = moe_alloc(sizeof *f, "safetensors file");
  if (!f) return MOE_ERR_OUT_OF_MEMORY;
  memset(f, 0, sizeof *f);
  f->path = st_strdup(path, "safetensors path");
  if (!f->path) {
    moe_free(f);
    return MOE_ERR_OUT_OF_MEMORY;
  }
  moe_status s = st_open_impl(f);
  if (s != MOE_SUCCESS) {
    st_file_free(f);
    return s;
  }
  *file = f;
  return MOE_SUCCESS;
}

moe_status moe_st_close(moe_st_file *file) {
  if (file) st_file_free(file);
  return MOE_SUCCESS;
}

int64_t moe_st_count(const moe_st_file *file) {
  if (!file) {
    moe_error(MOE_ERR_INVALID_ARGUMENT, "moe_st_count: file is NULL");
    return -1;
  }
  return file->count;
}

const char *moe_st_name(const moe_st_file *file, int64_t i) {
  if (!file) {
    moe_error(MOE_ERR_INVALID_ARGUMENT, "moe_st_name: file is NULL");
    return NULL;
  }
  if (i < 0 || i >= file->count) {
    moe_error(MOE_ERR_INVALID_ARGUMENT,
              "moe_st_name: index %lld out of range [0, %lld) in %s",
              (long long)i, (long long)file->count, file->path);
    return NULL;
  }
  return file->entries[i].name;
}

moe_status moe_st_get(const moe_st_file *file, const char *name,
                      moe_tensor *view) {
  if (!file)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "moe_st_get: file is NULL");
  if (!name)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "moe_st_get: name is NULL");
  if (!view)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "moe_st_get: view is NULL");
  const st_key *k = st_find(file->by_name, file->count, name);
  if (!k)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_st_get: tensor '%s' not found in %s", name,
                     file->path);
  const st_entry *e = &file->entries[k->index];
  *view = moe_tensor_make(file->data + e->begin, e->dtype, e->ndim, e->shape);
  return MOE_SUCCESS;
}

int moe_st_has(const moe_st_file *file, const char *name) {
  if (!file || !name) return 0;
  return st_find(file->by_name, file->count, name) != NULL;
}

const char *moe_st_metadata(const moe_st_file *file, const char *key) {
  if (!file || !key) return NULL;
  const st_key *k = st_find(file->meta, file->meta_count, key);
  return k ? k->value : NULL;
}

/* ---- writer ---------------------------------------------------------- */

/// A tensor copied into row-major order, waiting to be written.
typedef struct st_wtensor {
  char *name;
  moe_dtype dtype;
  int ndim;
  int64_t shape[MOE_MAX_DIMS];
  unsigned char *data; ///< NULL when bytes == 0
  int64_t bytes;
} st_wtensor;

typedef struct st_pair {
  char *key, *value;
} st_pair;

struct moe_st_writer {
  st_wtensor *t; ///< insertion order
  int64_t count, cap;
  /// Open-addressing hash set of tensor indices (-1 = empty), so that
  /// duplicate checks stay O(1) for models with tens of thousands of
  /// tensors. Size is a power of two, at least twice `count`.
  int64_t *slots;
  int64_t nslots;
  st_pair *meta; ///< metadata in insertion order
  int64_t mcount, mcap;
  int64_t total_bytes;
};

static uint64_t st_hash(const char *s) {
  uint64_t h = 1469598103934665603ull; // FNV-1a
  for (; *s; s++)
    h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

/// The slot holding `name`, or the empty slot where it would go.
static int64_t st_slot(const moe_st_writer *w, const char *name) {
  uint64_t mask = (uint64_t)w->nslots - 1;
  uint64_t i = st_hash(name) & mask;
  while (w->slots[i] >= 0 && strcmp(w->t[w->slots[i]].name, name) != 0)
    i = (i + 1) & mask;
  return (int64_t)i;
}

/// Makes room for one more tensor in the hash set.
static moe_status st_rehash(moe_st_writer *w) {
  if ((w->count + 1) * 2 <= w->nslots) return MOE_SUCCESS;
  int64_t n = w->nslots ? w->nslots * 2 : 64;
  int64_t *slots = st_alloc_array(n, sizeof *slots, "safetensors name table");
  if (!slots) return MOE_ERR_OUT_OF_MEMORY;
  for (int64_t i = 0; i < n; i++)
    slots[i] = -1;
  moe_free(w->slots);
  w->slots = slots;
  w->nslots = n;
  for (int64_t i = 0; i < w->count; i++)
    w->slots[st_slot(w, w->t[i].name)] = i;
  return MOE_SUCCESS;
}

/// Grows *arr (of *cap elements of `size` bytes) to hold `need` elements.
static moe_status st_grow(void **arr, int64_t *cap, int64_t need, size_t size,
                          const char *what) {
  if (need <= *cap) return MOE_SUCCESS;
  int64_t n = *cap ? *cap : 8;
  while (n < need)
    if (!moe_mul_ok(n, 2, &n))
      return moe_error(MOE_ERR_OUT_OF_MEMORY, "%s: too many entries", what);
  void *p = st_alloc_array(n, size, what);
  if (!p) return MOE_ERR_OUT_OF_MEMORY;
  if (*cap) memcpy(p, *arr, (size_t)*cap * size);
  moe_free(*arr);
  *arr = p;
  *cap = n;
  return MOE_SUCCESS;
}

moe_status moe_st_writer_create(moe_st_writer **w) {
  if (!w)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "moe_st_writer_create: w is NULL");
  *w = moe_alloc(sizeof **w, "safetensors writer");
  if (!*w) return MOE_ERR_OUT_OF_MEMORY;
  memset(*w, 0, sizeof **w);
  return MOE_SUCCESS;
}

moe_status moe_st_writer_destroy(moe_st_writer *w) {
  if (!w) return MOE_SUCCESS;
  for (int64_t i = 0; i < w->count; i++) {
    moe_free(w->t[i].name);
    moe_free(w->t[i].data);
  }
  for (int64_t i = 0; i < w->mcount; i++) {
    moe_free(w->meta[i].key);
    moe_free(w->meta[i].value);
  }
  moe_free(w->t);
  moe_free(w->slots);
  moe_free(w->meta);
  moe_free(w);
  return MOE_SUCCESS;
}

/// Checks `t` for the writer and returns its row-major byte size. Also checks
/// that every element's byte offset from t->data fits in int64, so the
/// gather's pointer arithmetic cannot overflow.
static moe_status st_check_view(const moe_tensor *t, const char *name,
                                int64_t *bytes) {
  const char *fn = "moe_st_writer_add";
  if (t->ndim == 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: tensor '%s': ndim is 0 (absent); scalars are not "
                     "supported",
                     fn, name);
  if (t->ndim < 0 || t->ndim > MOE_MAX_DIMS)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: tensor '%s': ndim %d outside [1, %d]", fn, name,
                     t->ndim, MOE_MAX_DIMS);
  if (!st_dtype_str(t->dtype))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: tensor '%s': unknown dtype %d", fn, name,
                     (int)t->dtype);
  if (t->device.type != MOE_DEVICE_CPU)
    return moe_error(MOE_ERR_UNIMPLEMENTED,
                     "%s: tensor '%s': not on the CPU; copy it to host memory "
                     "first",
                     fn, name);
  int64_t es = (int64_t)moe_dtype_size(t->dtype), numel = 1, extent = 0;
  for (int d = 0; d < t->ndim; d++) {
    if (t->shape[d] < 0 || t->shape[d] >= (int64_t)ST_INT_LIMIT)
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: tensor '%s': shape[%d] = %lld outside [0, 2^53)",
                       fn, name, d, (long long)t->shape[d]);
    if (!moe_mul_ok(numel, t->shape[d], &numel))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: tensor '%s': element count overflows int64", fn,
                       name);
  }
  if (!moe_mul_ok(numel, es, bytes) || *bytes >= (int64_t)ST_INT_LIMIT)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: tensor '%s': byte size is 2^53 or more", fn, name);
  if (numel == 0) return MOE_SUCCESS;
  if (!t->data)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: tensor '%s': data is NULL",
                     fn, name);
  for (int d = 0; d < t->ndim; d++) {
    int64_t s = t->stride[d], term;
    if (s == INT64_MIN || !moe_mul_ok(t->shape[d] - 1, s < 0 ? -s : s, &term) ||
        !moe_add_ok(extent, term, &extent))
      return moe_error(MOE_ERR_INVALID_ARGUMENT,
                       "%s: tensor '%s': stride %lld of dim %d overflows", fn,
                       name, (long long)s, d);
  }
  if (!moe_mul_ok(extent, es, &extent))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: tensor '%s': strides span more than 2^63 bytes", fn,
                     name);
  return MOE_SUCCESS;
}

/// Copies one element of `es` bytes; constant sizes let memcpy inline.
static inline void st_copy_elem(unsigned char *dst, const unsigned char *src,
                                size_t es) {
  switch (es) {
  case 2: memcpy(dst, src, 2); break;
  case 4: memcpy(dst, src, 4); break;
  case 8: memcpy(dst, src, 8); break;
  default: memcpy(dst, src, es); break;
  }
}

/// Copies the strided view `t` (validated by st_check_view, numel > 0) into
/// `dst` in row-major order.
static void st_gather(const moe_tensor *t, unsigned char *dst, int64_t bytes) {
  int64_t es = (int64_t)moe_dtype_size(t->dtype);
  int64_t shape[MOE_MAX_DIMS] = {1, 1, 1, 1}, stride[MOE_MAX_DIMS] = {0};
  int lead = MOE_MAX_DIMS - t->ndim;
  bool packed = true;
  int64_t expect = 1;
  for (int d = t->ndim - 1; d >= 0; d--) {
    shape[lead + d] = t->shape[d];
    stride[lead + d] = t->stride[d];
    if (t->shape[d] != 1 && t->stride[d] != expect) packed = false;
    expect *= t->shape[d];
  }
  const unsigned char *src = t->data;
  if (packed) {
    memcpy(dst, src, (size_t)bytes);
    return;
  }
  bool rows = stride[3] == 1 || shape[3] == 1;
  for (int64_t i0 = 0; i0 < shape[0]; i0++)
    for (int64_t i1 = 0; i1 < shape[1]; i1++)
      for (int64_t i2 = 0; i2 < shape[2]; i2++) {
        const unsigned char *row =
            src + (i0 * stride[0] + i1 * stride[1] + i2 * stride[2]) * es;
        if (rows) {
          memcpy(dst, row, (size_t)(shape[3] * es));
          dst += shape[3] * es;
          continue;
        }
        for (int64_t i3 = 0; i3 < shape[3]; i3++, dst += es)
          st_copy_elem(dst, row + i3 * stride[3] * es, (size_t)es);
      }
}

/// MOE_ERR_INVALID_ARGUMENT unless the string argument `s` (`what`, of
/// the entry `of` when given) is given and valid UTF-8.
static moe_status st_str_arg(const char *fn, const char *what, const char *of,
                             const char *s) {
  char who[320];
  if (of)
    snprintf(who, sizeof who, "%s of '%.256s'", what, of);
  else
    snprintf(who, sizeof who, "%s", what);
  size_t bad;
  if (!s) return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn, who);
  if (!st_utf8_valid((const unsigned char *)s, strlen(s), &bad))
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: %s is not valid UTF-8 (byte %zu)", fn, who, bad);
  return MOE_SUCCESS;
}

/// The writer `w` and its first string argument.
static moe_status st_writer_arg(const char *fn, const moe_st_writer *w,
                                const char *what, const char *s) {
  if (!w) return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: w is NULL", fn);
  return st_str_arg(fn, what, NULL, s);
}

moe_status moe_st_writer_add(moe_st_writer *w, const char *name,
                             const moe_tensor *t) {
  const char *fn = "moe_st_writer_add";
  MOE_TRY(st_writer_arg(fn, w, "name", name));
  if (!t)
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: tensor '%s': t is NULL", fn,
                     name);
  if (name[0] == '\0')
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: name is empty", fn);
  if (strcmp(name, ST_METADATA_KEY) == 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: name '%s' is reserved for metadata", fn, name);
  if (w->nslots && w->slots[st_slot(w, name)] >= 0)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: tensor '%s' was already added", fn, name);
  int64_t bytes = 0, total = 0;
  MOE_TRY(st_check_view(t, name, &bytes));
  if (!moe_add_ok(w->total_bytes, bytes, &total) ||
      total >= (int64_t)ST_INT_LIMIT)
    return moe_error(MOE_ERR_INVALID_ARGUMENT,
                     "%s: tensor '%s': the file would exceed 2^53 data bytes",
                     fn, name);
  MOE_TRY(st_grow((void **)&w->t, &w->cap, w->count + 1, sizeof *w->t,
                  "safetensors writer tensors"));
  MOE_TRY(st_rehash(w));

  st_wtensor e;
  memset(&e, 0, sizeof e);
  e.name = st_strdup(name, "safetensors tensor name");
  if (!e.name) return MOE_ERR_OUT_OF_MEMORY;
  if (bytes > 0) {
    e.data = moe_alloc((size_t)bytes, "safetensors tensor copy");
    if (!e.data) {
      moe_free(e.name);
      return MOE_ERR_OUT_OF_MEMORY;
    }
    st_gather(t, e.data, bytes);
  }
  e.dtype = t->dtype;
  e.ndim = t->ndim;
  for (int d = 0; d < t->ndim; d++)
    e.shape[d] = t->shape[d];
  e.bytes = bytes;
  w->t[w->count] = e;
  w->slots[st_slot(w, name)] = w->count;
  w->count++;
  w->total_bytes = total;
  return MOE_SUCCESS;
}

moe_status moe_st_writer_set_metadata(moe_st_writer *w, const char *key,
                                      const char *value) {
  const char *fn = "moe_st_writer_set_metadata";
  MOE_TRY(st_writer_arg(fn, w, "key", key));
  MOE_TRY(st_str_arg(fn, "value", key, value));
  char *v = st_strdup(value, "safetensors metadata value");
  if (!v) return MOE_ERR_OUT_OF_MEMORY;
  for (int64_t i = 0; i < w->mcount; i++)
    if (strcmp(w->meta[i].key, key) == 0) {
      moe_free(w->meta[i].value);
      w->meta[i].value = v;
      return MOE_SUCCESS;
    }
  char *k = st_strdup(key, "safetensors metadata key");
  moe_status s = k ? st_grow((void **)&w->meta, &w->mcap, w->mcount + 1,
                             sizeof *w->meta, "safetensors metadata")
                   : MOE_ERR_OUT_OF_MEMORY;
  if (s != MOE_SUCCESS) {
    moe_free(k);
    moe_free(v);
    return s;
  }
  w->meta[w->mcount++] = (st_pair){k, v};
  return MOE_SUCCESS;
}

/// Builds the JSON header; returns it (free with cJSON_free) or NULL.
static char *st_build_header(const moe_st_writer *w) {
  cJSON *root = cJSON_CreateObject();
  bool ok = root != NULL;
  if (ok && w->mcount > 0) {
    cJSON *md = cJSON_AddObjectToObject(root, ST_METADATA_KEY);
    ok = md != NULL;
    for (int64_t i = 0; ok && i < w->mcount; i++)
      ok =
          cJSON_AddStringToObject(md, w->meta[i].key, w->meta[i].value) != NULL;
  }
  int64_t offset = 0;
  for (int64_t i = 0; ok && i < w->count; i++) {
    const st_wtensor *e = &w->t[i];
    cJSON *obj = cJSON_AddObjectToObject(root, e->name);
    cJSON *shape = obj ? cJSON_AddArrayToObject(obj, "shape") : NULL;
    cJSON *off = shape ? cJSON_AddArrayToObject(obj, "data_offsets") : NULL;
    ok = off && cJSON_AddStringToObject(obj, "dtype", st_dtype_str(e->dtype));
    for (int d = 0; ok && d < e->ndim; d++) {
      cJSON *v = cJSON_CreateNumber((double)e->shape[d]);
      ok = v && cJSON_AddItemToArray(shape, v);
      if (!ok) cJSON_Delete(v);
    }
    // Exact as doubles: moe_st_writer_add keeps the total below 2^53.
    double be[2] = {(double)offset, (double)(offset + e->bytes)};
    for (int k = 0; ok && k < 2; k++) {
      cJSON *v = cJSON_CreateNumber(be[k]);
      ok = v && cJSON_AddItemToArray(off, v);
      if (!ok) cJSON_Delete(v);
    }
    offset += e->bytes;
  }
  char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
  cJSON_Delete(root);
  return text;
}

/* ---- temporary files of the writer ----------------------------------- */

/* Each write in flight records its temporary's name in a slot here, so that
   moe_st_remove_temporaries() -- async-signal-safe: atomics and unlink()
   only -- can remove it from a signal handler. A slot is FREE, CLAIMED
   (its owner is writing the name) or LIVE (the name may exist on disk). */
#define ST_TEMP_SLOTS 16
enum { ST_TEMP_FREE = 0, ST_TEMP_CLAIMED = 1, ST_TEMP_LIVE = 2 };
static atomic_int st_temp_state[ST_TEMP_SLOTS];
static char st_temp_names[ST_TEMP_SLOTS][PATH_MAX];
/// Name of the spare slot used when all ST_TEMP_SLOTS are busy: still a
/// correct write, only not removable by a signal handler.
static _Thread_local char st_temp_spare[PATH_MAX];

static const char *st_kind_name(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISSOCK(m)) return "a socket";
  return "a special file";
}

/// A well-mixed 64-bit value that differs between calls, threads and
/// processes (names only need to be unlikely to collide; O_EXCL decides).
static uint64_t st_temp_random(void) {
  static atomic_uint_fast64_t counter;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t z = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^
               ((uint64_t)getpid() << 40) ^ (uint64_t)(uintptr_t)&ts ^
               (atomic_fetch_add(&counter, 1) * 0x9e3779b97f4a7c15u);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
  return z ^ (z >> 31);
}

/// Creates the temporary file beside `path` as DIR/.moe-XXXXXXXXXXXX.tmp
/// (a short hidden name: it fits NAME_MAX whatever the target's length),
/// mode 0600, O_EXCL. Returns the descriptor (and *slot, the slot holding
/// its name) or -1 with errno set.
static int st_temp_create(const char *path, int *slot) {
  static const char digits[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  size_t n = strlen(path);
  while (n > 0 && path[n - 1] != '/')
    n--;
  if (n + 32 > PATH_MAX) {
    errno = ENAMETOOLONG;
    return -1;
  }
  int me = -1;
  for (int i = 0; i < ST_TEMP_SLOTS && me < 0; i++) {
    int want = ST_TEMP_FREE;
    if (atomic_compare_exchange_strong(&st_temp_state[i], &want,
                                       ST_TEMP_CLAIMED))
      me = i;
  }
  char *name = me >= 0 ? st_temp_names[me] : st_temp_spare;
  for (int attempt = 0; attempt < 100; attempt++) {
    memcpy(name, path, n);
    memcpy(name + n, ".moe-", 5);
    uint64_t r = st_temp_random();
    for (int i = 0; i < 12; i++, r /= 36)
      name[n + 5 + (size_t)i] = digits[r % 36];
    memcpy(name + n + 17, ".tmp", 5);
    /* LIVE before the file exists: a signal from here on removes it. */
    if (me >= 0) atomic_store(&st_temp_state[me], ST_TEMP_LIVE);
    int fd = open(name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd >= 0) {
      *slot = me >= 0 ? me : ST_TEMP_SLOTS;
      return fd;
    }
    int err = errno;
    if (me >= 0) atomic_store(&st_temp_state[me], ST_TEMP_CLAIMED);
    if (err != EEXIST) {
      if (me >= 0) atomic_store(&st_temp_state[me], ST_TEMP_FREE);
      errno = err;
      return -1;
    }
  }
  if (me >= 0) atomic_store(&st_temp_state[me], ST_TEMP_FREE);
  errno = EEXIST;
  return -1;
}

/// The name of temporary slot `slot` (ST_TEMP_SLOTS: this thread's spare).
#define st_temp_name(slot)                                                     \
  ((slot) < ST_TEMP_SLOTS ? st_temp_names[slot] : st_temp_spare)

static void st_temp_release(int slot) {
  if (slot < ST_TEMP_SLOTS) atomic_store(&st_temp_state[slot], ST_TEMP_FREE);
}

/// Writes all n bytes, retrying on EINTR and short writes. 0 or an errno.
static int st_write_all(int fd, const unsigned char *p, size_t n) {
  while (n > 0) {
    size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
    ssize_t k = write(fd, p, chunk);
    if (k < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (k == 0) return EIO;
    p += k;
    n -= (size_t)k;
  }
  return 0;
}

/// Makes a finished rename durable. Best effort: some file systems refuse
/// to fsync a directory, and the data itself is already safe.
static void st_sync_dir(const char *path) {
  size_t n = strlen(path);
  while (n > 0 && path[n - 1] != '/')
    n--;
  char *dir = moe_alloc(n + 2, "safetensors directory name");
  if (!dir) return;
  if (n == 0) {
    strcpy(dir, ".");
  } else {
    memcpy(dir, path, n);
    dir[n] = '\0';
  }
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    fsync(fd);
    close(fd);
  }
  moe_free(dir);
}

/// Writes the header and every tensor to `fd`. 0 or an errno.
static int st_write_body(const moe_st_writer *w, int fd,
                         const unsigned char *hdr, size_t hdr_len) {
  int e = st_write_all(fd, hdr, hdr_len);
  for (int64_t i = 0; !e && i < w->count; i++)
    if (w->t[i].bytes > 0)
      e = st_write_all(fd, w->t[i].data, (size_t)w->t[i].bytes);
  return e;
}

moe_status moe_st_writer_write(moe_st_writer *w, const char *path) {
  const char *fn = "moe_st_writer_write";
  if (!w) return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: w is NULL", fn);
  if (!path) return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: path is NULL", fn);
  if (path[0] == '\0')
    return moe_error(MOE_ERR_INVALID_ARGUMENT, "%s: path is empty", fn);

  char *json = st_build_header(w);
  if (!json)
    return moe_error(MOE_ERR_OUT_OF_MEMORY,
                     "%s: %s: out of memory building the JSON header", fn,
                     path);
  // Pad with spaces so that the data section starts 8-byte aligned.
  size_t len = strlen(json), padded = (len + 7) & ~(size_t)7;
  unsigned char *hdr = moe_alloc(8 + padded, "safetensors header");
  if (!hdr) {
    cJSON_free(json);
    return MOE_ERR_OUT_OF_MEMORY;
  }
  for (int i = 0; i < 8; i++)
    hdr[i] = (unsigned char)((uint64_t)padded >> (8 * i));
  memcpy(hdr + 8, json, len);
  memset(hdr + 8 + len, ' ', padded - len);
  cJSON_free(json);

  moe_status s = MOE_SUCCESS;
  // Never replace a device, FIFO, socket or directory with a regular file
  // (as root, --out /dev/null would otherwise replace the system's node).
  // stat follows symbolic links, so a link to one is refused too.
  struct stat st;
  bool exists = stat(path, &st) == 0;
  if (exists && !S_ISREG(st.st_mode)) {
    s = moe_error(MOE_ERR_IO,
                  "%s: %s exists and is %s, not a regular file; refusing to "
                  "replace it",
                  fn, path, st_kind_name(st.st_mode));
    moe_free(hdr);
    return s;
  }
  int slot = -1;
  int fd = st_temp_create(path, &slot);
  if (fd < 0) {
    s = moe_error(MOE_ERR_IO, "%s: %s: cannot create a temporary file: %s", fn,
                  path, strerror(errno));
    goto done;
  }
  const char *tmp = st_temp_name(slot);
  // The temporary is created mode 0600; give the file the mode an existing
  // target has, else 0644. Failure (e.g. file systems without modes) is
  // harmless.
  fchmod(fd, exists ? (st.st_mode & 07777) : 0644);

  int e = st_write_body(w, fd, hdr, 8 + padded);
  const char *step = "write";
  if (!e && fsync(fd) != 0) {
    e = errno;
    step = "fsync";
  }
  if (close(fd) != 0 && !e) {
    e = errno;
    step = "close";
  }
  if (!e && rename(tmp, path) != 0) {
    e = errno;
    step = "rename the temporary file over";
  }
  if (e) {
    unlink(tmp);
    s = moe_error(MOE_ERR_IO, "%s: cannot %s %s: %s", fn, step, path,
                  strerror(e));
  }
  st_temp_release(slot);
  if (!e) st_sync_dir(path);
done:
  moe_free(hdr);
  return s;
}

void moe_st_remove_temporaries(void) {
  for (int i = 0; i < ST_TEMP_SLOTS; i++)
    if (atomic_load(&st_temp_state[i]) == ST_TEMP_LIVE)
      unlink(st_temp_names[i]);
}
