/// @file moe_io.h
/// safetensors reading (mmap, fully validated) and atomic writing.
#ifndef MOE_IO_H
#define MOE_IO_H

#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/// An open, validated safetensors file mapped read-only.
typedef struct moe_st_file moe_st_file;

/// Opens and validates `path`: header length, JSON, dtypes, shapes against
/// byte sizes, offsets in range and not overlapping, integer overflow.
/// Failure: MOE_ERR_IO (cannot open/map) or MOE_ERR_FORMAT (message names
/// the file, the tensor and the reason).
MOE_API moe_status moe_st_open(const char *path, moe_st_file **file);
MOE_API moe_status moe_st_close(moe_st_file *file);

/// Number of tensors and the i-th name (in file order).
MOE_API int64_t moe_st_count(const moe_st_file *file);
MOE_API const char *moe_st_name(const moe_st_file *file, int64_t i);

/// A contiguous read-only view of tensor `name` (data points into the
/// mapping). MOE_ERR_INVALID_ARGUMENT if absent.
MOE_API moe_status moe_st_get(const moe_st_file *file, const char *name,
                              moe_tensor *view);
/// 1 if the file holds tensor `name`.
MOE_API int moe_st_has(const moe_st_file *file, const char *name);

/// The `__metadata__` string value of `key`, or NULL if absent.
MOE_API const char *moe_st_metadata(const moe_st_file *file, const char *key);

/// Builds a file in memory, then writes it atomically.
typedef struct moe_st_writer moe_st_writer;

MOE_API moe_status moe_st_writer_create(moe_st_writer **w);
MOE_API moe_status moe_st_writer_destroy(moe_st_writer *w);
/// Adds a tensor; strided views are gathered into row-major order. The data
/// is copied now, so the view may be freed after the call.
MOE_API moe_status moe_st_writer_add(moe_st_writer *w, const char *name,
                                     const moe_tensor *t);
MOE_API moe_status moe_st_writer_set_metadata(moe_st_writer *w, const char *key,
                                              const char *value);
/// Writes to a temporary file beside `path`, fsyncs, renames over `path`.
/// On failure no file is left at `path` (an old one stays untouched) and no
/// temporary remains.
///
/// - An existing `path` must be a regular file (or a symbolic link to one):
///   a directory, device, FIFO or socket is refused with MOE_ERR_IO and
///   left as it is.
/// - The temporary is a short hidden name in the same directory,
///   `.moe-XXXXXXXXXXXX.tmp`, so any valid `path` (basename up to NAME_MAX)
///   works.
/// - Signals: libmoe installs no signal handler and changes no signal mask.
///   A process killed by a signal during the write would leave its
///   temporary; to prevent that, a program's handler for SIGINT, SIGTERM,
///   SIGHUP... calls moe_st_remove_temporaries() before it ends the process
///   (the `moe` CLI does). SIGKILL cannot be caught: a temporary may then
///   remain.
/// - Several threads may write different writers at the same time.
MOE_API moe_status moe_st_writer_write(moe_st_writer *w, const char *path);

/// Removes the temporary file of every moe_st_writer_write in flight in
/// this process; those writes then fail (their rename finds no file).
/// Async-signal-safe: meant to be called from a signal handler that then
/// ends the process. Covers up to 16 writes in flight at once.
MOE_API void moe_st_remove_temporaries(void);

#ifdef __cplusplus
}
#endif
#endif /* MOE_IO_H */
