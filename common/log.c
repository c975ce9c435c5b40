/* log.c - leveled logging to stderr (see log.h). */
#include "common/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *log_progname = "duplex";
static enum dx_log_level log_min_level = DX_LOG_INFO;
static int log_to_journal = -1;

static const char *const level_names[] = {"debug", "info", "warn", "error"};
/* syslog priorities: debug 7, info 6, warning 4, err 3 */
static const int level_priorities[] = {7, 6, 4, 3};

void dx_log_init(const char *progname, enum dx_log_level level)
{
    log_progname = progname;
    log_min_level = level;
    log_to_journal = getenv("JOURNAL_STREAM") != NULL;
}

void dx_log_set_level(enum dx_log_level level)
{
    log_min_level = level;
}

int dx_log_level_parse(const char *name, enum dx_log_level *out)
{
    for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
        if (strcmp(name, level_names[i]) == 0) {
            *out = (enum dx_log_level)i;
            return 0;
        }
    }
    return -EINVAL;
}

void dx_log(enum dx_log_level level, const char *fmt, ...)
{
    if (level < log_min_level)
        return;
    if (log_to_journal < 0)
        log_to_journal = getenv("JOURNAL_STREAM") != NULL;

    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);

    if (log_to_journal) {
        fprintf(stderr, "<%d>%s: %s\n", level_priorities[level], level_names[level], text);
        return;
    }
    struct timespec ts;
    struct tm tm;
    char stamp[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
    fprintf(stderr, "%s.%03ldZ %s %s: %s\n", stamp, ts.tv_nsec / 1000000L, log_progname,
            level_names[level], text);
}

#undef dx_errf /* the static analyzer's stand-in (log.h): the function itself here */
int dx_errf(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    va_list ap;

    if (err && errlen > 0) {
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}
