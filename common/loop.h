/* loop.h - shutting a libuv loop down cleanly. */
#ifndef DX_LOOP_H
#define DX_LOOP_H

#include <uv.h>

/* Closes every handle still open on loop, runs the loop until their close
 * callbacks have run, and closes it. Returns 0 or a libuv error. */
int dx_loop_close(uv_loop_t *loop);

#endif
