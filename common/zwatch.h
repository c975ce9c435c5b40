/* zwatch.h - watches a ZeroMQ socket from a libuv loop.
 *
 * ZMQ_FD is edge-triggered and may signal without a message being ready, and
 * a zmq_send() or zmq_recv() can make the socket readable without any edge on
 * the fd. So the fd alone cannot drive the loop: before the loop blocks (uv
 * prepare) the watcher reads ZMQ_EVENTS; if the wanted events are already
 * pending it starts an idle handle so the loop does not block, otherwise it
 * polls ZMQ_FD. Right after the loop wakes (uv check) it reads ZMQ_EVENTS
 * again and calls the callback when wanted events are pending. The callback
 * should handle a bounded number of messages (DX_ZWATCH_BATCH) and return;
 * the watcher calls it again on the next loop turn while more are pending,
 * so timers and other sockets get their turn.
 */
#ifndef DX_ZWATCH_H
#define DX_ZWATCH_H

#include <uv.h>

/* Messages a callback should take per call before yielding to the loop. */
#define DX_ZWATCH_BATCH 64

typedef struct dx_zwatch dx_zwatch_t;

/* revents: the ZMQ_POLLIN / ZMQ_POLLOUT bits that are pending. */
typedef void (*dx_zwatch_cb)(dx_zwatch_t *w, int revents, void *arg);

/* Watches zsock for `events` (ZMQ_POLLIN and/or ZMQ_POLLOUT). The socket
 * stays owned by the caller and must outlive the watcher. Returns 0 or
 * -errno. */
int dx_zwatch_create(uv_loop_t *loop, void *zsock, int events, dx_zwatch_cb cb, void *arg,
                     dx_zwatch_t **out);

/* Stops watching; the memory is released once libuv has closed the handles
 * (on a later loop turn). Safe to call from the watcher's own callback. */
void dx_zwatch_destroy(dx_zwatch_t *w);

void *dx_zwatch_socket(dx_zwatch_t *w);

#endif
