/* test_ckroot.c - a job's checkpoint.dir on a worker
 * (wk_runtime_checkpoint_dir): relative dirs are taken from the checkpoint
 * root, and whatever the dir names, once the symbolic links of its existing
 * part are resolved, must lie under the root; ".." is refused; errors name
 * checkpoint.dir and the root. And a cpu assignment whose checkpoint.dir
 * leads outside is refused by wk_runtime_create. Everything lives in a
 * mkdtemp directory under /tmp, removed afterwards. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "common/fs.h"
#include "worker/net/dataplane.h"
#include "worker/runtime.h"

#define ERR_LEN 512

static char base[PATH_MAX];    /* the mkdtemp directory, resolved */
static char root[PATH_MAX];    /* BASE/root, the checkpoint root */
static char outside[PATH_MAX]; /* BASE/outside, next to it */
static char out[PATH_MAX], err[ERR_LEN];

static void in_base(char *buf, const char *name)
{
    snprintf(buf, PATH_MAX, "%s/%s", base, name);
}

static void setup(void)
{
    char tmp[64] = "/tmp/test_ckroot.XXXXXX";

    cr_assert_not_null(mkdtemp(tmp));
    cr_assert_not_null(realpath(tmp, base)); /* /tmp may itself be a link */
    in_base(root, "root");
    in_base(outside, "outside");
    cr_assert_eq(mkdir(root, 0755), 0);
    cr_assert_eq(mkdir(outside, 0755), 0);
}

static void teardown(void)
{
    dx_remove_tree(base);
}

TestSuite(ckroot, .init = setup, .fini = teardown);

static int resolve(const char *r, const char *dir)
{
    out[0] = err[0] = '\0';
    return wk_runtime_checkpoint_dir(r, dir, out, sizeof(out), err, sizeof(err));
}

static void expect_under(const char *dir, const char *want_rel)
{
    char want[PATH_MAX];

    snprintf(want, sizeof(want), "%s%s%s", root, want_rel[0] ? "/" : "", want_rel);
    cr_assert_eq(resolve(root, dir), 0, "%s: %s", dir, err);
    cr_assert_str_eq(out, want, "%s", dir);
}

static void expect_refused(const char *r, const char *dir, int want_rc, const char *word)
{
    cr_assert_eq(resolve(r, dir), want_rc, "%s accepted as %s", dir, out);
    cr_assert_not_null(strstr(err, "checkpoint.dir"), "%s", err);
    cr_assert_not_null(strstr(err, "checkpoint root"), "%s", err);
    if (word)
        cr_assert_not_null(strstr(err, word), "\"%s\" does not say %s", err, word);
}

Test(ckroot, relative_dirs_are_taken_from_the_root)
{
    expect_under("var/checkpoints", "var/checkpoints");
    expect_under("./a//b/", "a/b");
    expect_under(".", "");
    expect_under("a..b/...", "a..b/...");
    /* the working directory plays no part */
    cr_assert_eq(chdir(outside), 0);
    expect_under("ck", "ck");
}

Test(ckroot, absolute_dirs_must_lie_under_the_root)
{
    char dir[PATH_MAX];

    snprintf(dir, sizeof(dir), "%s/ck/deep", root);
    expect_under(dir, "ck/deep");
    expect_under(root, "");
    snprintf(dir, sizeof(dir), "%s/ck", outside);
    expect_refused(root, dir, -EINVAL, "outside");
    cr_assert_not_null(strstr(err, root), "the root is named: %s", err);
    expect_refused(root, "/etc", -EINVAL, "outside");
    expect_refused(root, "/", -EINVAL, "outside");
    /* a name that only starts like the root is not under it */
    snprintf(dir, sizeof(dir), "%skit/ck", root);
    expect_refused(root, dir, -EINVAL, "outside");
}

Test(ckroot, dot_dot_is_refused_in_every_form)
{
    static const char *const bad[] = {"..",     "../x",    "a/../b", "a/..", "../../../../outside",
                                      "./../x", "a//..//b"};
    char dir[PATH_MAX];

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_refused(root, bad[i], -EINVAL, "\"..\"");
    /* even one that would come back under the root */
    snprintf(dir, sizeof(dir), "%s/a/../b", root);
    expect_refused(root, dir, -EINVAL, "\"..\"");
    cr_assert_eq(access(outside, F_OK), 0);
}

Test(ckroot, symbolic_links_are_followed_both_ways)
{
    char link_out[PATH_MAX], link_in[PATH_MAX], dir[PATH_MAX], want[PATH_MAX];

    /* a link in the root leading out: refused, relative or absolute */
    snprintf(link_out, sizeof(link_out), "%s/escape", root);
    cr_assert_eq(symlink(outside, link_out), 0);
    expect_refused(root, "escape/ck", -EINVAL, "outside");
    cr_assert_not_null(strstr(err, outside), "where it leads is named: %s", err);
    snprintf(dir, sizeof(dir), "%s/ck", link_out);
    expect_refused(root, dir, -EINVAL, "outside");
    /* a link elsewhere leading in: fine, and out is where it leads */
    in_base(link_in, "into-root");
    cr_assert_eq(symlink(root, link_in), 0);
    snprintf(dir, sizeof(dir), "%s/ck", link_in);
    snprintf(want, sizeof(want), "%s/ck", root);
    cr_assert_eq(resolve(root, dir), 0, "%s", err);
    cr_assert_str_eq(out, want);
    /* the root itself given by a link: resolved first */
    snprintf(dir, sizeof(dir), "%s/ck", root);
    cr_assert_eq(resolve(link_in, dir), 0, "%s", err);
    cr_assert_str_eq(out, want);
    cr_assert_eq(resolve(link_in, "ck"), 0, "%s", err);
    cr_assert_str_eq(out, want);
}

Test(ckroot, the_root_must_exist_and_slash_holds_everything)
{
    char missing[PATH_MAX];

    in_base(missing, "no-such-root");
    expect_refused(missing, "ck", -ENOENT, "no-such-root");
    cr_assert_eq(resolve("/", "/srv/duplex/ck"), 0, "%s", err);
    cr_assert_str_eq(out, "/srv/duplex/ck");
}

Test(ckroot, paths_in_errors_are_escaped)
{
    cr_assert_eq(resolve(root, "/etc/\033[2J\n"), -EINVAL);
    cr_assert_null(strchr(err, '\033'), "%s", err);
    cr_assert_null(strchr(err, '\n'), "%s", err);
    cr_assert_not_null(strstr(err, "\\x1b[2J\\x0a"), "%s", err);
}

/* The runtime refuses a cpu assignment whose checkpoint.dir leads outside
 * the root before it builds anything, with the reason for AssignmentAck. */
Test(ckroot, a_cpu_assignment_outside_the_root_is_refused)
{
    Duplex__Assignment a = DUPLEX__ASSIGNMENT__INIT;
    Duplex__Peer peer = DUPLEX__PEER__INIT, *peers[] = {&peer};
    void *zctx = zmq_ctx_new();
    wk_net_t *data = NULL;
    wk_runtime_t *rt = NULL;
    char spec[PATH_MAX + 256], addr[WK_NET_ADDR_MAX], step_dir[PATH_MAX];

    cr_assert_eq(wk_net_create(zctx, "tcp://127.0.0.1:*", "h", NULL, &data, err, sizeof(err)), 0,
                 "%s", err);
    snprintf(addr, sizeof(addr), "%s", wk_net_addr(data));
    peer.worker_id = "w0";
    peer.data_addr = addr;
    a.job_id = 7;
    a.attempt = 1;
    a.schedule = "1f1b";
    a.pp = a.ep = a.dp = 1;
    a.microbatches = 1;
    a.steps = 1;
    a.peers = peers;
    a.n_peers = 1;
    snprintf(spec, sizeof(spec),
             "{\"parallel\": {\"schedule\": \"1f1b\", \"pp\": 1, \"microbatches\": 1},"
             " \"checkpoint\": {\"every\": 1, \"dir\": \"%s/ck\"}}",
             outside);
    a.spec_json = spec;
    cr_assert_eq(
        wk_runtime_create(zctx, data, &a, "w0",
                          &(struct wk_runtime_opts){.backend = "cpu", .checkpoint_root = root}, &rt,
                          err, sizeof(err)),
        -EDOM); /* the job's fault: AssignmentAck.bad_spec */
    cr_assert_null(rt);
    cr_assert_not_null(strstr(err, "checkpoint.dir"), "%s", err);
    cr_assert_not_null(strstr(err, root), "%s", err);
    /* nothing was made outside */
    snprintf(step_dir, sizeof(step_dir), "%s/ck", outside);
    cr_assert_neq(access(step_dir, F_OK), 0);
    /* a spec with ".." never gets that far: the parser refuses it */
    a.spec_json = "{\"parallel\": {\"schedule\": \"1f1b\", \"pp\": 1, \"microbatches\": 1},"
                  " \"checkpoint\": {\"dir\": \"../../outside\"}}";
    cr_assert_eq(
        wk_runtime_create(zctx, data, &a, "w0",
                          &(struct wk_runtime_opts){.backend = "cpu", .checkpoint_root = root}, &rt,
                          err, sizeof(err)),
        -EINVAL);
    cr_assert_not_null(strstr(err, "checkpoint.dir"), "%s", err);
    cr_assert_not_null(strstr(err, "\"..\""), "%s", err);
    wk_net_destroy(data);
    zmq_ctx_term(zctx);
}
