/// @file test_safetensors.c
/// Tests of the safetensors reader and writer: exact round trips (strided
/// views included), rejection of malformed files written here into a
/// temporary directory, argument checks, and atomic replacement on write.
/// Prints one line per check and ends with "N passed, M failed".
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "moe.h"
#include "moe_io.h"

static int g_pass, g_fail;
static char g_dir[64];

static void check(bool ok, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void check(bool ok, int line, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  printf("%s: ", ok ? "ok  " : "FAIL");
  vprintf(fmt, ap);
  va_end(ap);
  if (!ok) printf("  (line %d; last error: %s)", line, moe_last_error());
  printf("\n");
  if (ok)
    g_pass++;
  else
    g_fail++;
}
#define CHECK(cond, ...) check((cond), __LINE__, __VA_ARGS__)

/// A path inside the test directory (static buffer rotation: 4 at a time).
static const char *tpath(const char *name) {
  static char buf[4][512];
  static int next;
  char *p = buf[next++ % 4];
  snprintf(p, sizeof buf[0], "%s/%s", g_dir, name);
  return p;
}

static bool write_bytes(const char *path, const void *p, size_t n) {
  FILE *f = fopen(path, "wb");
  if (!f) return false;
  bool ok = fwrite(p, 1, n, f) == n;
  return fclose(f) == 0 && ok;
}

/// Writes a safetensors file: the 8-byte length `hlen` (or the JSON length
/// when hlen is UINT64_MAX), the JSON bytes, then `data_len` data bytes.
static bool write_st(const char *path, const char *json, uint64_t hlen,
                     size_t data_len) {
  size_t jl = strlen(json);
  if (hlen == UINT64_MAX) hlen = jl;
  size_t n = 8 + jl + data_len;
  unsigned char *buf = calloc(1, n);
  if (!buf) return false;
  for (int i = 0; i < 8; i++)
    buf[i] = (unsigned char)(hlen >> (8 * i));
  memcpy(buf + 8, json, jl);
  for (size_t i = 0; i < data_len; i++)
    buf[8 + jl + i] = (unsigned char)i;
  bool ok = write_bytes(path, buf, n);
  free(buf);
  return ok;
}

static bool file_exists(const char *path) {
  struct stat st;
  return stat(path, &st) == 0;
}

/// Number of temporary-looking entries ("*.tmp.*", ".moe-*") in the test
/// directory.
static int count_temps(void) {
  DIR *d = opendir(g_dir);
  if (!d) return -1;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL)
    if (strstr(e->d_name, ".tmp.") || strncmp(e->d_name, ".moe-", 5) == 0) n++;
  closedir(d);
  return n;
}

/// Opens `path` expecting `want`; checks the handle stays NULL and that the
/// message names the file (and `needle`, when given).
static void expect_fail(const char *what, const char *path, moe_status want,
                        const char *needle) {
  moe_st_file *f = (moe_st_file *)(uintptr_t)1;
  moe_status s = moe_st_open(path, &f);
  const char *msg = moe_last_error();
  CHECK(s == want && f == NULL, "%s -> %s (%s)", what, moe_status_name(want),
        moe_status_name(s));
  CHECK(msg[0] != '\0' && strstr(msg, path) != NULL,
        "%s: message names the file: %s", what, msg);
  if (needle)
    CHECK(strstr(msg, needle) != NULL, "%s: message mentions '%s'", what,
          needle);
  if (s == MOE_SUCCESS) moe_st_close(f);
}

/// A malformed file with a correct length prefix and `data_len` data bytes.
static void bad_header(const char *what, const char *json, size_t data_len,
                       const char *needle) {
  const char *p = tpath("bad.safetensors");
  if (!write_st(p, json, UINT64_MAX, data_len)) {
    CHECK(false, "%s: cannot write the test file", what);
    return;
  }
  expect_fail(what, p, MOE_ERR_FORMAT, needle);
}

/* ---- round trip ------------------------------------------------------ */

/// Expected row-major bytes of a strided view, gathered independently of
/// the library (odometer over the index space).
static unsigned char *gather_ref(const moe_tensor *t, size_t *bytes) {
  size_t es = moe_dtype_size(t->dtype);
  int64_t n = moe_tensor_numel(t);
  *bytes = (size_t)n * es;
  unsigned char *out = malloc(*bytes ? *bytes : 1);
  int64_t idx[MOE_MAX_DIMS] = {0};
  for (int64_t k = 0; k < n; k++) {
    int64_t off = 0;
    for (int d = 0; d < t->ndim; d++)
      off += idx[d] * t->stride[d];
    memcpy(out + (size_t)k * es, (const char *)t->data + off * (int64_t)es, es);
    for (int d = t->ndim - 1; d >= 0; d--) {
      if (++idx[d] < t->shape[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

typedef struct {
  const char *name;
  moe_tensor view;
} named;

static void test_round_trip(void) {
  float a[6];
  for (int i = 0; i < 6; i++)
    a[i] = (float)i * 1.5f - 2.0f;
  uint16_t b[32];
  for (int i = 0; i < 32; i++)
    b[i] = (uint16_t)(0x3f80 + i * 7);
  int64_t c[5] = {-1, 0, 1, INT64_MAX, INT64_MIN};
  float m[12];
  for (int i = 0; i < 12; i++)
    m[i] = (float)(i * i) + 0.25f;
  int32_t odd[105];
  for (int i = 0; i < 105; i++)
    odd[i] = i * 1000003 - 7;
  double g[2 * 3 * 4 * 5];
  for (int i = 0; i < 120; i++)
    g[i] = 1.0 / (i + 1);
  uint16_t h[10];
  for (int i = 0; i < 10; i++)
    h[i] = (uint16_t)(0x3c00 + i);

  int64_t sa[] = {2, 3}, sb[] = {4, 8}, sc[] = {5}, sm[] = {3, 4};
  int64_t so[] = {3, 5, 7}, sg[] = {2, 3, 4, 5}, se[] = {0, 5}, sh[] = {10};
  moe_tensor tm = moe_tensor_make(m, MOE_F32, 2, sm), tmt, gn, gnt;
  moe_tensor tg = moe_tensor_make(g, MOE_F64, 4, sg);
  moe_tensor_transpose(&tm, 0, 1, &tmt); // [4, 3], strides (1, 4)
  moe_tensor_narrow(&tg, 2, 1, 2, &gn);  // [2, 3, 2, 5]
  moe_tensor_transpose(&gn, 1, 3, &gnt); // [2, 5, 2, 3], no stride 1 inside
  moe_tensor every_other = moe_tensor_make(h, MOE_F16, 1, sh);
  every_other.shape[0] = 5;
  every_other.stride[0] = 2;
  named ts[] = {
      {"a.f32", moe_tensor_make(a, MOE_F32, 2, sa)},
      {"b.bf16", moe_tensor_make(b, MOE_BF16, 2, sb)},
      {"c.i64", moe_tensor_make(c, MOE_I64, 1, sc)},
      {"m.transposed", tmt},
      {"empty", moe_tensor_make(NULL, MOE_F32, 2, se)},
      {"odd.i32", moe_tensor_make(odd, MOE_I32, 3, so)},
      {"g.f64.narrow.transposed", gnt},
      {"h.f16.stride2", every_other},
      {"caf\xc3\xa9 \"quoted\" \\name", moe_tensor_make(a, MOE_F32, 1, sc)},
  };
  const int nt = (int)(sizeof ts / sizeof *ts);

  moe_st_writer *w = NULL;
  CHECK(moe_st_writer_create(&w) == MOE_SUCCESS && w, "writer_create");
  bool added = true;
  for (int i = 0; i < nt; i++)
    added &= moe_st_writer_add(w, ts[i].name, &ts[i].view) == MOE_SUCCESS;
  CHECK(added, "writer_add of %d tensors (views, empty, f16/bf16/i32/i64/f64)",
        nt);
  CHECK(moe_st_writer_set_metadata(w, "format", "pt") == MOE_SUCCESS &&
            moe_st_writer_set_metadata(w, "note", "first") == MOE_SUCCESS &&
            moe_st_writer_set_metadata(w, "note", "second") == MOE_SUCCESS &&
            moe_st_writer_set_metadata(w, "empty", "") == MOE_SUCCESS,
        "set_metadata (with a replaced key)");

  // The writer copies at add time: scribbling over the sources afterwards
  // must not change the file.
  unsigned char *ref[sizeof ts / sizeof *ts];
  size_t ref_bytes[sizeof ts / sizeof *ts];
  for (int i = 0; i < nt; i++)
    ref[i] = gather_ref(&ts[i].view, &ref_bytes[i]);
  memset(a, 0xff, sizeof a);
  memset(m, 0xff, sizeof m);
  memset(g, 0xff, sizeof g);
  const char *p = tpath("rt.safetensors");
  CHECK(moe_st_writer_write(w, p) == MOE_SUCCESS, "write %s", p);
  moe_st_writer_destroy(w);
  CHECK(count_temps() == 0, "no temporary left after a successful write");

  // Layout: the data section starts 8-byte aligned.
  FILE *fp = fopen(p, "rb");
  unsigned char len8[8] = {0};
  bool got = fp && fread(len8, 1, 8, fp) == 8;
  if (fp) fclose(fp);
  uint64_t hl = 0;
  for (int i = 7; i >= 0; i--)
    hl = (hl << 8) | len8[i];
  CHECK(got && hl % 8 == 0, "header length %llu is a multiple of 8",
        (unsigned long long)hl);

  moe_st_file *f = NULL;
  CHECK(moe_st_open(p, &f) == MOE_SUCCESS && f, "open the written file");
  if (!f) {
    for (int i = 0; i < nt; i++)
      free(ref[i]);
    return;
  }
  CHECK(moe_st_count(f) == nt, "count %lld == %d", (long long)moe_st_count(f),
        nt);
  bool order = true;
  for (int i = 0; i < nt; i++)
    order &= moe_st_name(f, i) && strcmp(moe_st_name(f, i), ts[i].name) == 0;
  CHECK(order, "names in insertion order");
  CHECK(moe_st_name(f, nt) == NULL && moe_st_name(f, -1) == NULL,
        "moe_st_name out of range -> NULL");
  for (int i = 0; i < nt; i++) {
    moe_tensor v;
    const moe_tensor *src = &ts[i].view;
    moe_status s = moe_st_get(f, ts[i].name, &v);
    bool meta_ok = s == MOE_SUCCESS && v.dtype == src->dtype &&
                   v.ndim == src->ndim && v.device.type == MOE_DEVICE_CPU;
    for (int d = 0; meta_ok && d < v.ndim; d++)
      meta_ok &= v.shape[d] == src->shape[d];
    // Contiguous row-major strides.
    int64_t expect = 1;
    for (int d = v.ndim - 1; meta_ok && d >= 0; d--) {
      meta_ok &= v.stride[d] == expect;
      expect *= v.shape[d];
    }
    size_t nb = ref_bytes[i];
    bool bytes_ok = meta_ok && (nb == 0 || memcmp(v.data, ref[i], nb) == 0);
    free(ref[i]);
    CHECK(meta_ok && bytes_ok && moe_st_has(f, ts[i].name),
          "tensor '%s': dtype, shape, strides and %zu bytes exact", ts[i].name,
          nb);
  }
  const char *note = moe_st_metadata(f, "note");
  const char *fmt = moe_st_metadata(f, "format");
  const char *emp = moe_st_metadata(f, "empty");
  CHECK(note && strcmp(note, "second") == 0 && fmt && strcmp(fmt, "pt") == 0 &&
            emp && emp[0] == '\0',
        "metadata read back (replaced key holds the last value)");
  CHECK(moe_st_metadata(f, "absent") == NULL, "absent metadata key -> NULL");

  moe_tensor v;
  CHECK(moe_st_get(f, "nope", &v) == MOE_ERR_INVALID_ARGUMENT &&
            strstr(moe_last_error(), "nope") && strstr(moe_last_error(), p),
        "get of a missing tensor -> INVALID_ARGUMENT naming it and the file");
  CHECK(!moe_st_has(f, "nope") && !moe_st_has(f, ""), "has() of missing");
  CHECK(moe_st_get(NULL, "a", &v) == MOE_ERR_INVALID_ARGUMENT &&
            moe_st_get(f, NULL, &v) == MOE_ERR_INVALID_ARGUMENT &&
            moe_st_get(f, "a.f32", NULL) == MOE_ERR_INVALID_ARGUMENT,
        "get with NULL arguments -> INVALID_ARGUMENT");
  CHECK(moe_st_count(NULL) < 0 && moe_st_name(NULL, 0) == NULL &&
            !moe_st_has(NULL, "a") && moe_st_metadata(NULL, "a") == NULL,
        "queries on a NULL file");
  CHECK(moe_st_close(f) == MOE_SUCCESS, "close");
}

/// A file written by hand (not by the writer): unpadded header, no
/// metadata, keys in another order, unknown keys ignored.
static void test_foreign_file(void) {
  const char *p = tpath("foreign.safetensors");
  const char *json = "{\"w\":{\"shape\":[2],\"extra\":1,\"data_offsets\":"
                     "[0,8],\"dtype\":\"F32\"},\"z\":{\"dtype\":\"I32\","
                     "\"shape\":[0,3],\"data_offsets\":[8,8]}}";
  float vals[2] = {3.5f, -1.0f};
  size_t jl = strlen(json);
  unsigned char buf[512];
  for (int i = 0; i < 8; i++)
    buf[i] = (unsigned char)((uint64_t)jl >> (8 * i));
  memcpy(buf + 8, json, jl);
  memcpy(buf + 8 + jl, vals, sizeof vals);
  write_bytes(p, buf, 8 + jl + sizeof vals);
  moe_st_file *f = NULL;
  moe_tensor v;
  bool ok = moe_st_open(p, &f) == MOE_SUCCESS &&
            moe_st_get(f, "w", &v) == MOE_SUCCESS && v.dtype == MOE_F32 &&
            v.ndim == 1 && v.shape[0] == 2 &&
            memcmp(v.data, vals, sizeof vals) == 0 &&
            moe_st_metadata(f, "x") == NULL;
  CHECK(ok, "hand-made file with an unaligned data section reads back");
  moe_tensor z;
  CHECK(f && moe_st_get(f, "z", &z) == MOE_SUCCESS && z.shape[0] == 0 &&
            moe_tensor_numel(&z) == 0,
        "empty tensor at the end of the data section");
  moe_st_close(f);

  p = tpath("empty_header.safetensors");
  write_st(p, "{}      ", UINT64_MAX, 0);
  f = NULL;
  CHECK(moe_st_open(p, &f) == MOE_SUCCESS && moe_st_count(f) == 0,
        "header '{}' padded with spaces: no tensors");
  moe_st_close(f);

  // Many tensors: exercises the writer's name table growth.
  moe_st_writer *w = NULL;
  moe_st_writer_create(&w);
  int64_t one = 1;
  bool added = true;
  for (int i = 0; i < 3000; i++) {
    char name[32];
    int32_t val = i;
    snprintf(name, sizeof name, "layers.%d.w", i);
    moe_tensor t = moe_tensor_make(&val, MOE_I32, 1, &one);
    added &= moe_st_writer_add(w, name, &t) == MOE_SUCCESS;
  }
  moe_tensor t0 = moe_tensor_make(&one, MOE_I64, 1, &one);
  CHECK(added && moe_st_writer_add(w, "layers.1234.w", &t0) ==
                     MOE_ERR_INVALID_ARGUMENT,
        "3000 tensors added, duplicate among them rejected");
  p = tpath("many.safetensors");
  bool round = moe_st_writer_write(w, p) == MOE_SUCCESS;
  moe_st_writer_destroy(w);
  f = NULL;
  round = round && moe_st_open(p, &f) == MOE_SUCCESS && moe_st_count(f) == 3000;
  for (int i = 0; round && i < 3000; i += 7) {
    char name[32];
    snprintf(name, sizeof name, "layers.%d.w", i);
    moe_tensor v2;
    round =
        moe_st_get(f, name, &v2) == MOE_SUCCESS && memcmp(v2.data, &i, 4) == 0;
  }
  CHECK(round, "3000 tensors round trip, looked up by name");
  moe_st_close(f);
}

/* ---- malformed files ------------------------------------------------- */

static void test_malformed(void) {
  char p[512]; // own copy: bad_header() reuses tpath()'s buffers
  snprintf(p, sizeof p, "%s", tpath("raw.safetensors"));
  write_bytes(p, "", 0);
  expect_fail("empty file", p, MOE_ERR_FORMAT, NULL);
  write_bytes(p, "\x02\0\0\0\0\0\0", 7);
  expect_fail("7-byte file", p, MOE_ERR_FORMAT, NULL);
  write_st(p, "{}", 1000, 0);
  expect_fail("header length past the end", p, MOE_ERR_FORMAT, "past");
  write_st(p, "{}", (uint64_t)1 << 63, 0);
  expect_fail("header length 2^63", p, MOE_ERR_FORMAT, NULL);
  write_st(p, "{}", UINT64_MAX - 1, 0);
  expect_fail("header length 2^64-2", p, MOE_ERR_FORMAT, NULL);
  write_st(p, "{}", 1, 0);
  expect_fail("header length 1", p, MOE_ERR_FORMAT, NULL);
  write_st(p, "{}", 0, 0);
  expect_fail("header length 0", p, MOE_ERR_FORMAT, NULL);

  // Just over the 100 MB cap, in a sparse file that does hold it.
  uint64_t big = 100u * 1000u * 1000u + 1u;
  write_st(p, "{}", big, 0);
  bool grew = truncate(p, (off_t)(8 + big + 16)) == 0;
  CHECK(grew, "sparse file of %llu bytes", (unsigned long long)(8 + big));
  if (grew) expect_fail("header over 100 MB", p, MOE_ERR_FORMAT, "limit");

  bad_header("non-JSON header", "this is not json", 0, "JSON");
  bad_header("truncated JSON", "{\"a\":{\"dtype\":", 0, "JSON");
  bad_header("JSON array header", "[1, 2, 3]", 0, "object");
  bad_header("JSON string header", "\"abc\"", 0, "object");
  bad_header("trailing garbage", "{} x", 0, "JSON");
  bad_header("two objects", "{}{}", 0, "JSON");
  write_bytes(p, "\x04\0\0\0\0\0\0\0{}\0\0", 12);
  expect_fail("header padded with NUL bytes", p, MOE_ERR_FORMAT, "control");
  bad_header("invalid UTF-8 (lone continuation)",
             "{\"a\x80\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[0,4]}}",
             4, "UTF-8");
  bad_header("invalid UTF-8 (overlong '/')",
             "{\"\xc0\xaf\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[0,4]}}",
             4, "UTF-8");
  bad_header("invalid UTF-8 (surrogate)",
             "{\"\xed\xa0\x80\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[0,4]}}",
             4, "UTF-8");
  bad_header("raw control character in a name",
             "{\"a\x01\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[0,4]}}",
             4, "control");
  bad_header("escaped NUL in a name",
             "{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[0,4]}}",
             4, "NUL");
  bad_header("bad dtype",
             "{\"w1\":{\"dtype\":\"Q4_K\",\"shape\":[1],"
             "\"data_offsets\":[0,4]}}",
             4, "Q4_K");
  bad_header("bad dtype names the tensor",
             "{\"w1\":{\"dtype\":\"U8\",\"shape\":[1],"
             "\"data_offsets\":[0,1]}}",
             4, "'w1'");
  bad_header("dtype not a string",
             "{\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
             "dtype");
  bad_header("missing dtype", "{\"w\":{\"shape\":[1],\"data_offsets\":[0,4]}}",
             4, "dtype");
  bad_header("duplicate dtype key",
             "{\"w\":{\"dtype\":\"F32\",\"dtype\":\"I64\",\"shape\":[1],"
             "\"data_offsets\":[0,4]}}",
             4, "twice");
  bad_header("tensor entry not an object", "{\"w\":[1,2]}", 0, "object");
  bad_header("shape negative",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[-1,2],"
             "\"data_offsets\":[0,4]}}",
             8, "shape[0]");
  bad_header("shape fractional",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,1.5],"
             "\"data_offsets\":[0,12]}}",
             12, "shape[1]");
  bad_header("shape string",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[\"2\"],"
             "\"data_offsets\":[0,8]}}",
             8, "shape[0]");
  bad_header("shape 2^53",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[9007199254740992],"
             "\"data_offsets\":[0,4]}}",
             4, "shape[0]");
  bad_header("shape 1e400 (infinite)",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[1e400],"
             "\"data_offsets\":[0,4]}}",
             4, "shape[0]");
  bad_header("shape null",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":null,"
             "\"data_offsets\":[0,4]}}",
             4, "shape");
  bad_header("shape with 5 dims",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],"
             "\"data_offsets\":[0,4]}}",
             4, "5 dimensions");
  bad_header("scalar shape []",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[],"
             "\"data_offsets\":[0,4]}}",
             4, "scalars are not supported");
  bad_header("shape product overflows int64",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[1073741824,1073741824,"
             "1073741824,1073741824],\"data_offsets\":[0,4]}}",
             4, "overflows");
  bad_header("byte size overflows int64",
             "{\"w\":{\"dtype\":\"F64\",\"shape\":[2147483648,2147483648],"
             "\"data_offsets\":[0,8]}}",
             8, "byte size");
  bad_header("data_offsets past the data section",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],"
             "\"data_offsets\":[0,1000]}}",
             16, "past");
  bad_header("data_offsets begin > end",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[8,4]}}",
             16, "begin");
  bad_header("data_offsets with one entry",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[4]}}",
             16, "data_offsets");
  bad_header("data_offsets negative",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[-4,0]}}",
             16, "data_offsets");
  bad_header("size != numel * elemsize",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],"
             "\"data_offsets\":[0,12]}}",
             16, "needs 16 bytes");
  bad_header("overlapping offsets",
             "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],"
             "\"data_offsets\":[0,16]},"
             "\"b\":{\"dtype\":\"F32\",\"shape\":[4],"
             "\"data_offsets\":[8,24]}}",
             24, "overlap");
  bad_header("identical offsets",
             "{\"b\":{\"dtype\":\"I32\",\"shape\":[2],"
             "\"data_offsets\":[0,8]},"
             "\"a\":{\"dtype\":\"F32\",\"shape\":[2],"
             "\"data_offsets\":[0,8]}}",
             8, "overlap");
  bad_header("duplicate tensor names",
             "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[0,4]},"
             "\"w\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[4,8]}}",
             8, "twice");
  bad_header("metadata with a number value",
             "{\"__metadata__\":{\"format\":\"pt\",\"n\":3}}", 0, "'n'");
  bad_header("metadata with a null value", "{\"__metadata__\":{\"x\":null}}", 0,
             "not a string");
  bad_header("metadata not an object", "{\"__metadata__\":\"pt\"}", 0,
             "__metadata__");
  bad_header("metadata twice", "{\"__metadata__\":{},\"__metadata__\":{}}", 0,
             "twice");
  bad_header("metadata key twice",
             "{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", 0, "twice");
  bad_header("empty tensor name",
             "{\"\":{\"dtype\":\"F32\",\"shape\":[1],"
             "\"data_offsets\":[0,4]}}",
             4, "empty name");
  bad_header("truncated data section",
             "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],"
             "\"data_offsets\":[0,8]},"
             "\"b\":{\"dtype\":\"F32\",\"shape\":[2],"
             "\"data_offsets\":[8,16]}}",
             12, "truncated");

  // A valid file cut short after writing.
  moe_st_writer *w = NULL;
  moe_st_writer_create(&w);
  float x[64] = {0};
  int64_t n = 64;
  moe_tensor t = moe_tensor_make(x, MOE_F32, 1, &n);
  moe_st_writer_add(w, "x", &t);
  char q[512];
  snprintf(q, sizeof q, "%s", tpath("cut.safetensors"));
  moe_st_writer_write(w, q);
  moe_st_writer_destroy(w);
  struct stat st;
  bool cut = stat(q, &st) == 0 && truncate(q, st.st_size - 1) == 0;
  CHECK(cut, "truncate a written file by one byte");
  if (cut)
    expect_fail("written file cut by one byte", q, MOE_ERR_FORMAT, "'x'");

  expect_fail("nonexistent file", tpath("missing.safetensors"), MOE_ERR_IO,
              "No such file");
  expect_fail("directory", g_dir, MOE_ERR_IO, "directory");
  moe_st_file *f = NULL;
  CHECK(moe_st_open(NULL, &f) == MOE_ERR_INVALID_ARGUMENT &&
            strstr(moe_last_error(), "path"),
        "open(NULL path) -> INVALID_ARGUMENT naming path");
  CHECK(moe_st_open(p, NULL) == MOE_ERR_INVALID_ARGUMENT &&
            strstr(moe_last_error(), "file"),
        "open(NULL file) -> INVALID_ARGUMENT naming file");
  CHECK(moe_st_close(NULL) == MOE_SUCCESS, "close(NULL) is a no-op");
}

/* ---- writer arguments and atomicity ----------------------------------- */

static void test_writer_args(void) {
  moe_st_writer *w = NULL;
  moe_st_writer_create(&w);
  float x[4] = {1, 2, 3, 4};
  int64_t n = 4;
  moe_tensor t = moe_tensor_make(x, MOE_F32, 1, &n);
  CHECK(moe_st_writer_destroy(NULL) == MOE_SUCCESS, "writer_destroy(NULL)");
  CHECK(moe_st_writer_create(NULL) == MOE_ERR_INVALID_ARGUMENT,
        "writer_create(NULL) -> INVALID_ARGUMENT");
  CHECK(moe_st_writer_add(NULL, "x", &t) == MOE_ERR_INVALID_ARGUMENT &&
            strstr(moe_last_error(), "w is NULL"),
        "add(NULL writer) names w");
  CHECK(moe_st_writer_add(w, NULL, &t) == MOE_ERR_INVALID_ARGUMENT &&
            strstr(moe_last_error(), "name"),
        "add(NULL name) names name");
  CHECK(moe_st_writer_add(w, "x", NULL) == MOE_ERR_INVALID_ARGUMENT &&
            strstr(moe_last_error(), "t is NULL"),
        "add(NULL tensor) names t");
  CHECK(moe_st_writer_add(w, "", &t) == MOE_ERR_INVALID_ARGUMENT,
        "add with an empty name");
  CHECK(moe_st_writer_add(w, "__metadata__", &t) == MOE_ERR_INVALID_ARGUMENT,
        "add named __metadata__");
  CHECK(moe_st_writer_add(w, "bad\xff", &t) == MOE_ERR_INVALID_ARGUMENT,
        "add with a non-UTF-8 name");
  CHECK(moe_st_writer_add(w, "x", &t) == MOE_SUCCESS &&
            moe_st_writer_add(w, "x", &t) == MOE_ERR_INVALID_ARGUMENT &&
            strstr(moe_last_error(), "'x'"),
        "duplicate name rejected, naming it");
  moe_tensor absent;
  memset(&absent, 0, sizeof absent);
  CHECK(moe_st_writer_add(w, "s", &absent) == MOE_ERR_INVALID_ARGUMENT,
        "add of an ndim-0 tensor (scalar/absent)");
  moe_tensor bad = t;
  bad.dtype = (moe_dtype)42;
  CHECK(moe_st_writer_add(w, "d", &bad) == MOE_ERR_INVALID_ARGUMENT,
        "add with an unknown dtype");
  bad = t;
  bad.data = NULL;
  CHECK(moe_st_writer_add(w, "n", &bad) == MOE_ERR_INVALID_ARGUMENT,
        "add with NULL data and 4 elements");
  bad = t;
  bad.shape[0] = -1;
  CHECK(moe_st_writer_add(w, "neg", &bad) == MOE_ERR_INVALID_ARGUMENT,
        "add with a negative dim");
  bad = t;
  bad.stride[0] = INT64_MAX / 2;
  CHECK(moe_st_writer_add(w, "st", &bad) == MOE_ERR_INVALID_ARGUMENT,
        "add with a stride whose byte span overflows");
  bad = t;
  bad.device.type = MOE_DEVICE_CUDA;
  CHECK(moe_st_writer_add(w, "cu", &bad) == MOE_ERR_UNIMPLEMENTED,
        "add of a CUDA tensor -> UNIMPLEMENTED");
  CHECK(moe_st_writer_set_metadata(w, NULL, "v") == MOE_ERR_INVALID_ARGUMENT &&
            moe_st_writer_set_metadata(w, "k", NULL) ==
                MOE_ERR_INVALID_ARGUMENT &&
            moe_st_writer_set_metadata(NULL, "k", "v") ==
                MOE_ERR_INVALID_ARGUMENT,
        "set_metadata with NULL arguments");
  CHECK(moe_st_writer_write(w, NULL) == MOE_ERR_INVALID_ARGUMENT &&
            moe_st_writer_write(NULL, "x") == MOE_ERR_INVALID_ARGUMENT,
        "write with NULL arguments");
  // Broadcast (stride 0) views are gathered too.
  moe_tensor bc = t;
  bc.stride[0] = 0;
  CHECK(moe_st_writer_add(w, "bcast", &bc) == MOE_SUCCESS,
        "add of a stride-0 view");
  const char *p = tpath("args.safetensors");
  moe_st_file *f = NULL;
  moe_tensor v;
  bool ok = moe_st_writer_write(w, p) == MOE_SUCCESS &&
            moe_st_open(p, &f) == MOE_SUCCESS && moe_st_count(f) == 2 &&
            moe_st_get(f, "bcast", &v) == MOE_SUCCESS;
  float want[4] = {1, 1, 1, 1};
  CHECK(ok && memcmp(v.data, want, sizeof want) == 0,
        "failed adds left nothing behind; stride-0 view gathered");
  moe_st_close(f);
  moe_st_writer_destroy(w);
}

/// The first f32 of tensor `name` in `path`, or -1 on any error.
static float first_value(const char *path, const char *name) {
  moe_st_file *f = NULL;
  moe_tensor v;
  float r = -1.0f;
  if (moe_st_open(path, &f) == MOE_SUCCESS &&
      moe_st_get(f, name, &v) == MOE_SUCCESS)
    memcpy(&r, v.data, sizeof r);
  moe_st_close(f);
  return r;
}

static void test_atomic(void) {
  float one = 1.0f, two = 2.0f;
  int64_t n1 = 1;
  moe_st_writer *w1 = NULL, *w2 = NULL;
  moe_st_writer_create(&w1);
  moe_st_writer_create(&w2);
  moe_tensor t1 = moe_tensor_make(&one, MOE_F32, 1, &n1);
  moe_tensor t2 = moe_tensor_make(&two, MOE_F32, 1, &n1);
  moe_st_writer_add(w1, "v", &t1);
  moe_st_writer_add(w2, "v", &t2);

  char bad[256];
  snprintf(bad, sizeof bad, "%s/no/such/dir/out.safetensors", g_dir);
  CHECK(moe_st_writer_write(w1, bad) == MOE_ERR_IO &&
            strstr(moe_last_error(), bad),
        "write into a nonexistent directory -> IO naming the path");
  CHECK(!file_exists(bad) && count_temps() == 0,
        "... and leaves no file and no temporary");

  const char *p = tpath("replace.safetensors");
  CHECK(moe_st_writer_write(w1, p) == MOE_SUCCESS &&
            first_value(p, "v") == 1.0f,
        "write the first version");
  chmod(p, 0640);
  CHECK(moe_st_writer_write(w2, p) == MOE_SUCCESS &&
            first_value(p, "v") == 2.0f,
        "writing over an existing file replaces it");
  struct stat st;
  CHECK(stat(p, &st) == 0 && (st.st_mode & 0777) == 0640,
        "the replaced file keeps its mode");
  CHECK(count_temps() == 0, "no temporary after replacing");

  // rename() of a file over a directory fails after the data was written.
  const char *d = tpath("is_a_dir");
  mkdir(d, 0755);
  CHECK(moe_st_writer_write(w1, d) == MOE_ERR_IO && strstr(moe_last_error(), d),
        "write over a directory -> IO (rename fails)");
  CHECK(stat(d, &st) == 0 && S_ISDIR(st.st_mode) && count_temps() == 0,
        "... the directory is untouched and no temporary remains");

  // A write that fails midway (file size limit) leaves the old file.
  float big[4096];
  for (int i = 0; i < 4096; i++)
    big[i] = 7.0f;
  int64_t nb = 4096;
  moe_tensor tb = moe_tensor_make(big, MOE_F32, 1, &nb);
  moe_st_writer *w3 = NULL;
  moe_st_writer_create(&w3);
  moe_st_writer_add(w3, "v", &tb);
  struct rlimit old;
  getrlimit(RLIMIT_FSIZE, &old);
  struct rlimit lim = old;
  lim.rlim_cur = 4096;
  void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
  bool limited = setrlimit(RLIMIT_FSIZE, &lim) == 0;
  moe_status s = moe_st_writer_write(w3, p);
  setrlimit(RLIMIT_FSIZE, &old);
  signal(SIGXFSZ, prev);
  if (limited) {
    CHECK(s == MOE_ERR_IO && strstr(moe_last_error(), p),
          "write failing midway (RLIMIT_FSIZE) -> IO: %s", moe_last_error());
    CHECK(first_value(p, "v") == 2.0f && count_temps() == 0,
          "... the old file is untouched and no temporary remains");
  } else {
    printf("skip: setrlimit(RLIMIT_FSIZE) unavailable\n");
  }
  moe_st_writer_destroy(w1);
  moe_st_writer_destroy(w2);
  moe_st_writer_destroy(w3);
}

/* ---- issue 12: special targets, long names, signals -------------------- */

static moe_st_writer *one_value_writer(float *v) {
  int64_t n1 = 1;
  moe_st_writer *w = NULL;
  moe_st_writer_create(&w);
  moe_tensor t = moe_tensor_make(v, MOE_F32, 1, &n1);
  moe_st_writer_add(w, "v", &t);
  return w;
}

static void test_special_targets(void) {
  float one = 1.0f;
  moe_st_writer *w = one_value_writer(&one);
  struct stat st;
  const char *fifo = tpath("a_fifo");
  if (mkfifo(fifo, 0600) == 0) {
    CHECK(moe_st_writer_write(w, fifo) == MOE_ERR_IO &&
              strstr(moe_last_error(), "FIFO"),
          "write over a FIFO is refused, naming it: %s", moe_last_error());
    CHECK(lstat(fifo, &st) == 0 && S_ISFIFO(st.st_mode) && count_temps() == 0,
          "... the FIFO is still a FIFO and no temporary remains");
    unlink(fifo);
  } else {
    printf("skip: mkfifo unavailable: %s\n", strerror(errno));
  }
  const char *link = tpath("link_to_dev_null");
  if (symlink("/dev/null", link) == 0) {
    CHECK(moe_st_writer_write(w, link) == MOE_ERR_IO &&
              strstr(moe_last_error(), "character device"),
          "write over a link to /dev/null is refused: %s", moe_last_error());
    CHECK(lstat(link, &st) == 0 && S_ISLNK(st.st_mode) && count_temps() == 0,
          "... the link is untouched and no temporary remains");
    unlink(link);
  }
  const char *dir = tpath("a_dir");
  mkdir(dir, 0755);
  CHECK(moe_st_writer_write(w, dir) == MOE_ERR_IO &&
            strstr(moe_last_error(), "directory"),
        "write over a directory is refused: %s", moe_last_error());
  rmdir(dir);
  moe_st_writer_destroy(w);
}

static void test_long_names(void) {
  float one = 1.0f;
  moe_st_writer *w = one_value_writer(&one);
  for (int len = 245; len <= 255; len += 5) {
    char base[256];
    memset(base, 'n', (size_t)len);
    memcpy(base + len - 12, ".safetensors", 12);
    base[len] = '\0';
    const char *p = tpath(base);
    moe_status s = moe_st_writer_write(w, p);
    CHECK(s == MOE_SUCCESS && first_value(p, "v") == 1.0f,
          "write to a %d-character basename: %s", len,
          s ? moe_last_error() : "ok");
    CHECK(count_temps() == 0, "... no temporary remains");
    unlink(p);
  }
  moe_st_writer_destroy(w);
}

/// Handler of the child below: the documented cooperation.
static void remove_and_die(int sig) {
  moe_st_remove_temporaries();
  signal(sig, SIG_DFL);
  raise(sig);
}

/// A process killed by SIGINT / SIGTERM in the middle of a large write
/// leaves no temporary when its handler calls moe_st_remove_temporaries().
static void test_signal_cleanup(void) {
  size_t n = (size_t)16 << 20; /* 64 MiB of f32 */
  for (int round = 0; round < 2; round++) {
    int sig = round ? SIGTERM : SIGINT;
    const char *out = tpath("interrupted.safetensors");
    pid_t pid = fork();
    if (pid == 0) {
      signal(sig, remove_and_die);
      float *big = calloc(n, sizeof *big);
      int64_t shape = (int64_t)n;
      moe_st_writer *w = NULL;
      moe_st_writer_create(&w);
      moe_tensor t = moe_tensor_make(big, MOE_F32, 1, &shape);
      if (!big || moe_st_writer_add(w, "big", &t)) _exit(3);
      for (;;)
        moe_st_writer_write(w, out);
    }
    /* Wait until a temporary exists, then interrupt. */
    bool seen = false;
    for (int i = 0; i < 2000000 && !seen; i++)
      seen = count_temps() > 0;
    kill(pid, sig);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(seen && WIFSIGNALED(status) && WTERMSIG(status) == sig,
          "writer child killed by signal %d during a write (seen %d, "
          "status 0x%x)",
          sig, (int)seen, status);
    CHECK(count_temps() == 0, "signal %d during a write left %d temporary", sig,
          count_temps());
    unlink(out);
  }
}

/// Removes the test directory's files (one level plus is_a_dir).
static void cleanup(void) {
  DIR *d = opendir(g_dir);
  if (!d) return;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    const char *p = tpath(e->d_name);
    if (unlink(p) != 0) rmdir(p);
  }
  closedir(d);
  rmdir(g_dir);
}

int main(void) {
  strcpy(g_dir, "/tmp/moe_st_test.XXXXXX");
  if (!mkdtemp(g_dir)) {
    perror("mkdtemp");
    return 1;
  }
  test_round_trip();
  test_foreign_file();
  test_malformed();
  test_writer_args();
  test_atomic();
  test_special_targets();
  test_long_names();
  test_signal_cleanup();
  cleanup();
  printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
