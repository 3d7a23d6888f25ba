/*
 * bps.h - the C ABI of bps, a communication runtime for data-parallel training.
 *
 * Every function returns an int result code (BPS_OK, BPS_PENDING or a negative
 * BPS_ERR_* code); bps_last_error() gives the message of the last failing call on the
 * calling thread. Link with -lbps (libbps.so or libbps.a).
 */

#ifndef BPS_H
#define BPS_H

/* Generated from plugins/capi/src/lib.rs by plugins/capi/build.rs (cbindgen). Do not edit. */

#include <stddef.h>
#include <stdint.h>

/**
 * dtype code of IEEE 754 binary32 (`float`).
 */
#define BPS_FLOAT32 0

/**
 * dtype code of IEEE 754 binary64 (`double`).
 */
#define BPS_FLOAT64 1

/**
 * dtype code of IEEE 754 binary16 (half precision).
 */
#define BPS_FLOAT16 2

/**
 * dtype code of bfloat16 (the upper 16 bits of a binary32).
 */
#define BPS_BFLOAT16 3

/**
 * dtype code of `int32_t` (wrapping sums).
 */
#define BPS_INT32 4

/**
 * dtype code of `int64_t` (wrapping sums).
 */
#define BPS_INT64 5

/**
 * dtype code of `uint8_t` (wrapping sums).
 */
#define BPS_UINT8 6

/**
 * Result codes of the bps C functions: success is BPS_OK (0), an operation still running is
 * BPS_PENDING (1), every error is negative; the message of a failing call is in
 * bps_last_error(). The functions return them as a plain `int`.
 */
typedef enum BpsStatus {
  /**
   * Success; for bps_poll/bps_wait: the operation finished successfully.
   */
  BPS_OK = 0,
  /**
   * The operation is still running (bps_poll, bps_wait_timeout). Not an error.
   */
  BPS_PENDING = 1,
  /**
   * A null pointer, an unknown dtype code, a name that is not UTF-8 or out of bounds, a
   * byte count that is not a whole number of elements, a root outside the job.
   */
  BPS_ERR_INVALID_ARGUMENT = -1,
  /**
   * bps_init has not been called (or did not succeed) in this process.
   */
  BPS_ERR_NOT_INITIALIZED = -2,
  /**
   * bps_shutdown was called; the operation was refused or failed by the shutdown.
   */
  BPS_ERR_SHUT_DOWN = -3,
  /**
   * A tensor is used inconsistently across workers or calls (dtype, size, order).
   */
  BPS_ERR_MISMATCH = -4,
  /**
   * Communication failed: a peer died or refused, the rendezvous with the scheduler
   * failed, or the transport reported an error.
   */
  BPS_ERR_PEER = -5,
  /**
   * A peer did not answer within BPS_TIMEOUT.
   */
  BPS_ERR_TIMEOUT = -6,
  /**
   * An environment variable has a value that is not allowed.
   */
  BPS_ERR_CONFIG = -7,
  /**
   * The runtime abandoned the operation (one of its threads died), or a value does not
   * fit the C type.
   */
  BPS_ERR_INTERNAL = -8,
  /**
   * A panic inside bps was caught at the boundary; bps_last_error() has its message.
   */
  BPS_ERR_PANIC = -9,
  /**
   * Something this build or machine cannot do (GPU memory without CUDA, no usable GPU).
   */
  BPS_ERR_UNSUPPORTED = -10,
} BpsStatus;

/**
 * An asynchronous operation started by bps_push_pull_async or bps_broadcast_async. Opaque:
 * poll it with bps_poll, wait with bps_wait / bps_wait_timeout, release it with
 * bps_handle_free. A handle may be polled and waited on from any thread.
 */
typedef struct bps_handle_t bps_handle_t;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * Start bps in this process, configured from the environment (`DMLC_ROLE=worker`,
 * `DMLC_NUM_WORKER`, `DMLC_WORKER_ID`, `DMLC_PS_ROOT_URI`, `DMLC_PS_ROOT_PORT`, `BPS_*`, ...).
 * Blocks until every worker (and server) of the job has registered, at most BPS_TIMEOUT.
 *
 * Calling it again while bps runs does nothing and returns BPS_OK. After bps_shutdown it
 * starts a fresh instance (which needs a fresh job to join).
 *
 * Returns BPS_OK, or BPS_ERR_CONFIG (a bad variable), BPS_ERR_INVALID_ARGUMENT (e.g.
 * DMLC_ROLE is not worker), BPS_ERR_PEER (the rendezvous failed, a port is in use),
 * BPS_ERR_PANIC.
 */
int bps_init(void);

/**
 * Leave the job: waits until every worker left (so colocated servers finish serving), fails
 * whatever is still pending with BPS_ERR_SHUT_DOWN, and stops bps's threads. Handles stay
 * valid (free them as usual); later calls return BPS_ERR_SHUT_DOWN until bps_init.
 *
 * Returns BPS_OK (also when already shut down), BPS_ERR_NOT_INITIALIZED if bps_init never
 * succeeded, or BPS_ERR_PANIC.
 */
int bps_shutdown(void);

/**
 * This worker's rank, 0 ..= bps_size() - 1.
 *
 * Returns the rank (>= 0), or a negative code: BPS_ERR_NOT_INITIALIZED before bps_init,
 * BPS_ERR_SHUT_DOWN after bps_shutdown.
 */
int bps_rank(void);

/**
 * Number of workers in the job.
 *
 * Returns the count (>= 1), or a negative code as bps_rank.
 */
int bps_size(void);

/**
 * This worker's rank among the workers of its host (BYTEPS_LOCAL_RANK).
 *
 * Returns the local rank (>= 0), or a negative code as bps_rank.
 */
int bps_local_rank(void);

/**
 * Number of workers on this host (BYTEPS_LOCAL_SIZE).
 *
 * Returns the count (>= 1), or a negative code as bps_rank.
 */
int bps_local_size(void);

/**
 * Declare a tensor by name and store its id (declaration order) in `*tensor_id_out`.
 * Declaring a name again gives the same id. Every worker must declare the same tensors in
 * the same order; push_pull and broadcast declare a name on first use.
 *
 * Returns BPS_OK, BPS_ERR_INVALID_ARGUMENT (a null pointer, a name that is empty, too long or
 * not UTF-8), BPS_ERR_NOT_INITIALIZED, BPS_ERR_SHUT_DOWN.
 *
 * # Safety
 * `name` is null or a NUL-terminated string; `tensor_id_out` is null or valid for a write.
 */
int bps_declare(const char *name, uint32_t *tensor_id_out);

/**
 * Start summing `bytes` bytes of `dtype` elements at `input` across all workers into
 * `output` (which may equal `input`: in place); with `average` non-zero the sum is divided
 * by the number of workers. Higher `priority` goes first. Returns at once; on BPS_OK
 * `*handle_out` is a new handle to poll, wait on and free.
 *
 * The buffers belong to bps until the operation finishes (bps_poll or bps_wait gives
 * something other than BPS_PENDING, or bps_handle_free returned): do not write `input` nor
 * read or write `output` before then, and keep both allocated. `input` and `output` may be
 * null only when `bytes` is 0.
 *
 * Returns BPS_OK, BPS_ERR_INVALID_ARGUMENT (a null pointer, an unknown dtype, a bad name,
 * `bytes` not a whole number of elements), BPS_ERR_NOT_INITIALIZED, BPS_ERR_SHUT_DOWN.
 * Failures of the operation itself (a dead peer, a mismatch, a timeout) come from bps_poll /
 * bps_wait. On failure `*handle_out` is set to NULL (if `handle_out` is not null).
 *
 * # Safety
 * `name` is null or a NUL-terminated string; `input` and `output` are null or valid for
 * `bytes` bytes until the operation finishes, as above; `handle_out` is null or valid for a
 * write.
 */
int bps_push_pull_async(const char *name,
                        int dtype,
                        const void *input,
                        void *output,
                        size_t bytes,
                        int average,
                        int priority,
                        struct bps_handle_t **handle_out);

/**
 * Start giving every worker the `bytes` bytes that worker `root` has at `buf` (in place: on
 * the other workers `buf` is overwritten). Returns at once; on BPS_OK `*handle_out` is a new
 * handle to poll, wait on and free.
 *
 * `buf` belongs to bps until the operation finishes, as for bps_push_pull_async; it may be
 * null only when `bytes` is 0.
 *
 * Returns BPS_OK, BPS_ERR_INVALID_ARGUMENT (a null pointer, an unknown dtype, a bad name,
 * a root outside 0 ..= bps_size() - 1), BPS_ERR_NOT_INITIALIZED, BPS_ERR_SHUT_DOWN. On
 * failure `*handle_out` is set to NULL (if `handle_out` is not null).
 *
 * # Safety
 * `name` is null or a NUL-terminated string; `buf` is null or valid for reads and writes of
 * `bytes` bytes until the operation finishes; `handle_out` is null or valid for a write.
 */
int bps_broadcast_async(const char *name,
                        int dtype,
                        void *buf,
                        size_t bytes,
                        int root,
                        int priority,
                        struct bps_handle_t **handle_out);

/**
 * Whether this build of bps has the CUDA path (GPU memory in bps_push_pull_device and
 * bps_broadcast_device). A build with it still starts on a machine without a GPU; whether
 * this machine has a usable one is bps_gpu_count's question. Needs no bps_init (never fails).
 *
 * Returns 1 (built with CUDA) or 0 (without: every GPU call gives BPS_ERR_UNSUPPORTED).
 */
int bps_cuda_compiled(void);

/**
 * Number of GPUs this process can use (the CUDA devices it sees: CUDA_VISIBLE_DEVICES
 * applies). The device ids of bps_push_pull_device are 0 ..= count - 1.
 *
 * Returns the count (>= 1), or BPS_ERR_UNSUPPORTED with the reason in bps_last_error (a
 * build without CUDA, no CUDA driver on this machine, a driver that fails, no device),
 * BPS_ERR_NOT_INITIALIZED before bps_init, BPS_ERR_SHUT_DOWN after bps_shutdown.
 */
int bps_gpu_count(void);

/**
 * Start summing, in place, `bytes` bytes of `dtype` elements in GPU memory at `dev_ptr` on
 * CUDA device `device_id` across all workers; with `average` non-zero the sum is divided by
 * the number of workers. Higher `priority` goes first. Returns at once; on BPS_OK
 * `*handle_out` is a new handle to poll, wait on and free, as for bps_push_pull_async.
 *
 * `dev_ptr` is a device address (`CUdeviceptr` or the `void *` of cudaMalloc) and `stream`
 * the CUDA stream (`CUstream` / `cudaStream_t`) whose work produces the data: bps orders its
 * own work after what is queued on `stream` at the time of the call, so the caller need not
 * synchronise first. NULL means the legacy default stream. The data is used in place: among
 * this host's GPUs it stays on the devices (NCCL), only what crosses hosts is staged through
 * pinned host memory by the runtime. When the operation finished (bps_poll or bps_wait gives
 * something other than BPS_PENDING), the result is in place and every GPU operation bps
 * queued on it has completed, so any stream may use it.
 *
 * The memory belongs to bps until the operation finishes: do not write or read it (from any
 * stream) before then, and keep it allocated. `dev_ptr` may be null only when `bytes` is 0.
 *
 * Returns BPS_OK, BPS_ERR_INVALID_ARGUMENT (a null pointer, a negative device_id, an unknown
 * dtype, a bad name, `bytes` not a whole number of elements, another device than the process
 * uses), BPS_ERR_UNSUPPORTED (this build has no CUDA, or this machine no usable GPU: the
 * message says why), BPS_ERR_NOT_INITIALIZED, BPS_ERR_SHUT_DOWN. Failures of the operation
 * itself come from bps_poll / bps_wait. On failure `*handle_out` is set to NULL (if
 * `handle_out` is not null).
 *
 * # Safety
 * `name` is null or a NUL-terminated string; `dev_ptr` is null or device memory of at least
 * `bytes` bytes on device `device_id`, left to bps until the operation finishes as above;
 * `stream` is null or a live stream of that device; `handle_out` is null or valid for a
 * write.
 */
int bps_push_pull_device(const char *name,
                         void *dev_ptr,
                         int device_id,
                         size_t bytes,
                         int dtype,
                         void *stream,
                         int average,
                         int priority,
                         struct bps_handle_t **handle_out);

/**
 * Start giving every worker the `bytes` bytes that worker `root` has in GPU memory at
 * `dev_ptr` on device `device_id` (in place: on the other workers the memory is overwritten).
 * Returns at once; on BPS_OK `*handle_out` is a new handle to poll, wait on and free.
 *
 * Memory, `stream` and completion as for bps_push_pull_device.
 *
 * Returns BPS_OK, BPS_ERR_INVALID_ARGUMENT (as bps_push_pull_device, or a root outside
 * 0 ..= bps_size() - 1), BPS_ERR_UNSUPPORTED, BPS_ERR_NOT_INITIALIZED, BPS_ERR_SHUT_DOWN. On
 * failure `*handle_out` is set to NULL (if `handle_out` is not null).
 *
 * # Safety
 * As bps_push_pull_device.
 */
int bps_broadcast_device(const char *name,
                         void *dev_ptr,
                         int device_id,
                         size_t bytes,
                         int dtype,
                         void *stream,
                         int root,
                         int priority,
                         struct bps_handle_t **handle_out);

/**
 * Whether the operation finished, without blocking (one atomic load).
 *
 * Returns BPS_OK (finished successfully), BPS_PENDING (still running), or the operation's
 * error code (BPS_ERR_PEER, BPS_ERR_TIMEOUT, BPS_ERR_MISMATCH, BPS_ERR_SHUT_DOWN, ...) with
 * its message in bps_last_error; BPS_ERR_INVALID_ARGUMENT for a null handle.
 *
 * # Safety
 * `h` is null or a handle from this library that was not freed.
 */
int bps_poll(const struct bps_handle_t *h);

/**
 * Block until the operation finishes. A lost peer fails it within BPS_TIMEOUT, and
 * bps_shutdown fails whatever is pending, so this does not hang forever.
 *
 * Returns BPS_OK, or the operation's error code as bps_poll.
 *
 * # Safety
 * `h` is null or a handle from this library that was not freed.
 */
int bps_wait(const struct bps_handle_t *h);

/**
 * As bps_wait, giving up after `timeout_ms` milliseconds (0: a poll).
 *
 * Returns BPS_OK, BPS_PENDING if the operation is still running at the deadline (not an
 * error: bps_last_error is left as it was), or the operation's error code as bps_poll.
 *
 * # Safety
 * `h` is null or a handle from this library that was not freed.
 */
int bps_wait_timeout(const struct bps_handle_t *h, uint64_t timeout_ms);

/**
 * Release a handle. If its operation is still running, this first waits for it to finish
 * (its result is discarded), so that when bps_handle_free returns bps no longer touches the
 * operation's buffers and they may be freed or reused. Like bps_wait it is bounded by
 * BPS_TIMEOUT and by bps_shutdown. A null `h` does nothing.
 *
 * # Safety
 * `h` is null or a handle from this library that was not freed yet; it must not be used
 * afterwards (nor concurrently by another thread).
 */
void bps_handle_free(struct bps_handle_t *h);

/**
 * The message of the last failing bps call on the calling thread, or "" if none failed yet.
 * Successful calls leave it unchanged. The string belongs to bps: it stays valid until the
 * next bps call on this thread (copy it to keep it). Never null.
 */
const char *bps_last_error(void);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* BPS_H */
