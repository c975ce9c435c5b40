/* admit.c - memory admission of submitted jobs (see admit.h): owns the
 * comparison of a spec's memory per rank with what the alive workers of
 * its backend reported, and the refusal's text. */
#include "coordinator/admit.h"

#include <errno.h>
#include <string.h>

#include "common/log.h"

struct admit_count {
    const struct job_spec *spec;
    uint64_t need;
    size_t alive, fit, small;
    uint64_t largest; /* the most any alive worker of the backend reported */
};

static void admit_count(struct admit_count *c, const struct coord_worker *w)
{
    if (w->state != COORD_WORKER_ALIVE || !w->backend || strcmp(w->backend, c->spec->backend) != 0)
        return;
    c->alive++;
    if (w->memory_bytes > c->largest)
        c->largest = w->memory_bytes;
    if (w->memory_bytes == 0 || w->memory_bytes >= c->need)
        c->fit++;
    else
        c->small++;
}

static int admit_each(struct coord_worker *w, void *arg)
{
    admit_count(arg, w);
    return 0;
}

static int admit_verdict(const struct admit_count *c, char *err, size_t errlen)
{
    const struct job_spec *s = c->spec;
    struct job_spec_memory m;
    char need[160], largest[32];
    int workers = job_spec_workers(s);

    if ((size_t)workers <= c->fit || c->small == 0)
        return 0;
    job_spec_memory(s, &m);
    return dx_errf(err, errlen, -ENOSPC,
                   "the job needs %s per rank; %zu of the %zu alive %s workers have that much, "
                   "and it needs %d (pp %d x ep %d x dp %d); the largest %s worker reports %s",
                   job_spec_memory_text(&m, need, sizeof(need)), c->fit, c->alive, s->backend,
                   workers, s->parallel.pp, s->parallel.ep, s->parallel.dp, s->backend,
                   job_spec_bytes_text(c->largest, largest, sizeof(largest)));
}

/* The sim backend allocates no model: nothing to check. */
static int admit_begin(const struct job_spec *spec, struct admit_count *c)
{
    struct job_spec_memory m;

    memset(c, 0, sizeof(*c));
    if (strcmp(spec->backend, "sim") == 0)
        return 0;
    job_spec_memory(spec, &m);
    c->spec = spec;
    c->need = m.total;
    return 1;
}

int coord_admit_check(const struct job_spec *spec, struct coord_worker *const *ws, size_t n,
                      char *err, size_t errlen)
{
    struct admit_count c;

    if (!admit_begin(spec, &c))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (ws[i])
            admit_count(&c, ws[i]);
    return admit_verdict(&c, err, errlen);
}

int coord_admit_registry(coord_registry_t *reg, const struct job_spec *spec, char *err,
                         size_t errlen)
{
    struct admit_count c;

    if (!admit_begin(spec, &c))
        return 0;
    coord_registry_each(reg, admit_each, &c);
    return admit_verdict(&c, err, errlen);
}
