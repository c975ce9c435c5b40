/* loop.c - shutting a libuv loop down cleanly (see loop.h). */
#include "common/loop.h"

static void loop_close_handle(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

int dx_loop_close(uv_loop_t *loop)
{
    uv_walk(loop, loop_close_handle, NULL);
    uv_run(loop, UV_RUN_DEFAULT);
    return uv_loop_close(loop);
}
