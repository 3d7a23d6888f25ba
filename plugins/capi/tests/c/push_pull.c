/*
 * A worker written in C against bps.h, run as a 2-worker job by tests/c_program.rs (any
 * number of workers works): push_pull of rank+1, broadcast from root 1, the GPU calls
 * (BPS_ERR_UNSUPPORTED on a machine without a usable GPU), argument checks.
 * Prints "c-abi ok" and exits 0 on success; prints the failure and exits 1 otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bps.h"

#define N 1000

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "c-abi FAIL (%s:%d): ", __FILE__, __LINE__);   \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, " [bps_last_error: %s]\n", bps_last_error());  \
            exit(1);                                                       \
        }                                                                  \
    } while (0)

int main(void) {
    CHECK(bps_rank() == BPS_ERR_NOT_INITIALIZED, "bps_rank before bps_init");
    CHECK(strlen(bps_last_error()) > 0, "no message before bps_init");

    int rc = bps_init();
    CHECK(rc == BPS_OK, "bps_init returned %d", rc);
    CHECK(bps_init() == BPS_OK, "a second bps_init");
    int rank = bps_rank(), size = bps_size();
    CHECK(rank >= 0 && size >= 1 && rank < size, "rank %d size %d", rank, size);
    CHECK(bps_local_rank() >= 0 && bps_local_size() >= 1, "local rank %d size %d",
          bps_local_rank(), bps_local_size());

    uint32_t id = 12345;
    rc = bps_declare("c.grad", &id);
    CHECK(rc == BPS_OK && id == 0, "bps_declare returned %d, id %u", rc, (unsigned)id);
    uint32_t again = 999;
    CHECK(bps_declare("c.grad", &again) == BPS_OK && again == id, "declaring again gave %u",
          (unsigned)again);

    /* push_pull: every worker contributes rank+1, so each element sums to 1+2+...+size. */
    float *in = malloc(N * sizeof(float)), *out = malloc(N * sizeof(float));
    CHECK(in && out, "malloc");
    for (int i = 0; i < N; i++) {
        in[i] = (float)(rank + 1);
        out[i] = -1.0f;
    }
    bps_handle_t *h = NULL;
    rc = bps_push_pull_async("c.grad", BPS_FLOAT32, in, out, N * sizeof(float), 0, 0, &h);
    CHECK(rc == BPS_OK && h != NULL, "bps_push_pull_async returned %d", rc);
    rc = bps_poll(h);
    CHECK(rc == BPS_OK || rc == BPS_PENDING, "bps_poll returned %d", rc);
    rc = bps_wait(h);
    CHECK(rc == BPS_OK, "bps_wait returned %d", rc);
    CHECK(bps_poll(h) == BPS_OK, "bps_poll after bps_wait");
    CHECK(bps_wait_timeout(h, 10) == BPS_OK, "bps_wait_timeout after bps_wait");
    bps_handle_free(h);
    const float expected = (float)size * (float)(size + 1) / 2.0f;
    for (int i = 0; i < N; i++) {
        CHECK(out[i] == expected, "out[%d] = %g, expected %g", i, out[i], expected);
    }

    /* In place, averaged: the mean of 1..size. */
    for (int i = 0; i < N; i++) {
        in[i] = (float)(rank + 1);
    }
    rc = bps_push_pull_async("c.grad", BPS_FLOAT32, in, in, N * sizeof(float), 1, 0, &h);
    CHECK(rc == BPS_OK, "averaged bps_push_pull_async returned %d", rc);
    do {
        rc = bps_wait_timeout(h, 50);
    } while (rc == BPS_PENDING);
    CHECK(rc == BPS_OK, "bps_wait_timeout returned %d", rc);
    bps_handle_free(h);
    for (int i = 0; i < N; i++) {
        CHECK(in[i] == expected / (float)size, "averaged in[%d] = %g", i, in[i]);
    }

    /* Broadcast from root 1. */
    if (size > 1) {
        int32_t buf[N];
        for (int i = 0; i < N; i++) {
            buf[i] = rank == 1 ? 1000 + i : -7;
        }
        rc = bps_broadcast_async("c.bcast", BPS_INT32, buf, sizeof buf, 1, 0, &h);
        CHECK(rc == BPS_OK, "bps_broadcast_async returned %d", rc);
        rc = bps_wait(h);
        CHECK(rc == BPS_OK, "broadcast bps_wait returned %d", rc);
        bps_handle_free(h);
        for (int i = 0; i < N; i++) {
            CHECK(buf[i] == 1000 + i, "broadcast buf[%d] = %d", i, (int)buf[i]);
        }
        rc = bps_broadcast_async("c.bcast", BPS_INT32, buf, sizeof buf, size, 0, &h);
        CHECK(rc == BPS_ERR_INVALID_ARGUMENT && h == NULL, "root = size gave %d", rc);
    }

    /* GPU memory. Without a usable GPU (or in a build without CUDA) the device calls return
     * BPS_ERR_UNSUPPORTED with the reason and no handle, and never touch the pointer; with a
     * GPU they are not run here (this program has only host memory). */
    int cuda = bps_cuda_compiled();
    CHECK(cuda == 0 || cuda == 1, "bps_cuda_compiled returned %d", cuda);
    int ngpu = bps_gpu_count();
    if (ngpu > 0) {
        printf("c-abi: %d GPU(s) visible, device calls not run on host memory\n", ngpu);
    } else {
        CHECK(ngpu == BPS_ERR_UNSUPPORTED, "bps_gpu_count returned %d", ngpu);
        static const char prefix[] = "bps_gpu_count: no usable GPU: ";
        CHECK(strncmp(bps_last_error(), prefix, sizeof prefix - 1) == 0, "bps_gpu_count message");
        char reason[512];
        snprintf(reason, sizeof reason, "%s", bps_last_error() + sizeof prefix - 1);
        CHECK(strlen(reason) > 10, "bps_gpu_count gives no reason");
        printf("c-abi: cuda compiled %d, %s\n", cuda, bps_last_error());
        h = (bps_handle_t *)&rc;
        rc = bps_push_pull_device("c.gpu", in, 0, N * sizeof(float), BPS_FLOAT32, NULL, 1, 0, &h);
        CHECK(rc == BPS_ERR_UNSUPPORTED, "bps_push_pull_device without a GPU gave %d", rc);
        CHECK(h == NULL, "handle_out not cleared");
        const char *why = bps_last_error();
        CHECK(strncmp(why, "bps_push_pull_device: unsupported: ", 35) == 0 && strlen(why) > 40,
              "message does not say why");
        if (cuda) {
            /* the same reason as bps_gpu_count's, e.g. no driver on this machine */
            CHECK(strstr(why, reason) != NULL, "message lacks the reason \"%s\"", reason);
        } else {
            CHECK(strstr(why, "cuda") != NULL, "message does not say the build lacks CUDA");
        }
        printf("c-abi: %s\n", why);
        rc = bps_broadcast_device("c.gpu.bcast", in, 0, N * sizeof(float), BPS_FLOAT32, NULL, 0,
                                  0, &h);
        CHECK(rc == BPS_ERR_UNSUPPORTED && h == NULL, "bps_broadcast_device gave %d", rc);
        for (int i = 0; i < N; i++) {
            CHECK(in[i] == expected / (float)size, "device call changed in[%d]", i);
        }
    }
    /* Argument checks come first, GPU or not: nothing is touched. */
    rc = bps_push_pull_device("c.gpu", NULL, 0, 64, BPS_FLOAT32, NULL, 0, 0, &h);
    CHECK(rc == BPS_ERR_INVALID_ARGUMENT && h == NULL, "null dev_ptr gave %d", rc);
    CHECK(strstr(bps_last_error(), "dev_ptr") != NULL, "message does not name dev_ptr");
    rc = bps_push_pull_device("c.gpu", in, -1, 64, BPS_FLOAT32, NULL, 0, 0, &h);
    CHECK(rc == BPS_ERR_INVALID_ARGUMENT && h == NULL, "device_id -1 gave %d", rc);
    CHECK(strstr(bps_last_error(), "device_id") != NULL, "message does not name device_id");
    rc = bps_push_pull_device("c.gpu", in, 0, 64, 77, NULL, 0, 0, &h);
    CHECK(rc == BPS_ERR_INVALID_ARGUMENT && h == NULL, "dtype 77 gave %d", rc);
    CHECK(strstr(bps_last_error(), "dtype") != NULL, "message does not name dtype");
    rc = bps_push_pull_device("c.gpu", in, 0, 64, BPS_FLOAT32, NULL, 0, 0, NULL);
    CHECK(rc == BPS_ERR_INVALID_ARGUMENT, "null handle_out gave %d", rc);
    CHECK(strstr(bps_last_error(), "handle_out") != NULL, "message does not name handle_out");
    rc = bps_broadcast_device(NULL, in, 0, 64, BPS_FLOAT32, NULL, 0, 0, &h);
    CHECK(rc == BPS_ERR_INVALID_ARGUMENT && h == NULL, "null name gave %d", rc);
    CHECK(strstr(bps_last_error(), "name") != NULL, "message does not name name");
    rc = bps_broadcast_device("c.gpu.bcast", in, 0, 64, BPS_FLOAT32, NULL, -1, 0, &h);
    CHECK(rc == BPS_ERR_INVALID_ARGUMENT && h == NULL, "root -1 gave %d", rc);
    CHECK(strstr(bps_last_error(), "root") != NULL, "message does not name root");

    /* Bad arguments: an error code, a message naming the argument, no handle. */
    h = (bps_handle_t *)&rc;
    rc = bps_push_pull_async("c.bad", 99, in, out, N * sizeof(float), 0, 0, &h);
    CHECK(rc == BPS_ERR_INVALID_ARGUMENT, "dtype 99 gave %d", rc);
    CHECK(h == NULL, "handle_out not cleared");
    CHECK(strlen(bps_last_error()) > 0, "empty bps_last_error");
    CHECK(strstr(bps_last_error(), "dtype") != NULL, "message does not name dtype");
    CHECK(bps_declare(NULL, &id) == BPS_ERR_INVALID_ARGUMENT, "null name");
    CHECK(strstr(bps_last_error(), "name") != NULL, "message does not name name");
    CHECK(bps_wait(NULL) == BPS_ERR_INVALID_ARGUMENT, "null handle");
    bps_handle_free(NULL);

    free(in);
    free(out);
    rc = bps_shutdown();
    CHECK(rc == BPS_OK, "bps_shutdown returned %d", rc);
    CHECK(bps_rank() == BPS_ERR_SHUT_DOWN, "bps_rank after bps_shutdown");
    CHECK(bps_shutdown() == BPS_OK, "a second bps_shutdown");
    printf("c-abi ok (rank %d of %d)\n", rank, size);
    return 0;
}
