/* log.h - leveled logging to stderr shared by every duplex program.
 *
 * Lines look like "2026-11-28T17:30:54.123Z duplexd info: text". Under systemd
 * (JOURNAL_STREAM set) the timestamp is left to the journal and a syslog
 * priority prefix ("<6>") is written instead. dx_errf formats the reason
 * of a failure for functions that return -errno with an error buffer.
 */
#ifndef DX_LOG_H
#define DX_LOG_H

#include <stddef.h>

enum dx_log_level {
    DX_LOG_DEBUG = 0,
    DX_LOG_INFO,
    DX_LOG_WARN,
    DX_LOG_ERROR,
};

/* Sets the program name shown on each line and the lowest level written. */
void dx_log_init(const char *progname, enum dx_log_level level);
void dx_log_set_level(enum dx_log_level level);

/* Parses "debug", "info", "warn" or "error"; returns 0 or -EINVAL. */
int dx_log_level_parse(const char *name, enum dx_log_level *out);

void dx_log(enum dx_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define dx_debug(...) dx_log(DX_LOG_DEBUG, __VA_ARGS__)
#define dx_info(...) dx_log(DX_LOG_INFO, __VA_ARGS__)
#define dx_warn(...) dx_log(DX_LOG_WARN, __VA_ARGS__)
#define dx_error(...) dx_log(DX_LOG_ERROR, __VA_ARGS__)

/* For functions that return -errno with a reason: writes the formatted
 * reason into err (when err is not NULL and errlen > 0) and returns rc. */
int dx_errf(char *err, size_t errlen, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* The static analyzer (clang-tidy defines __clang_analyzer__) cannot see
 * into log.c: for it, dx_errf returns rc here, or a caller's
 * "return dx_errf(..., -EINVAL, ...)" might return anything at all. */
#ifdef __clang_analyzer__
#define dx_errf(err, errlen, rc, ...) (dx_errf((err), (errlen), 0, __VA_ARGS__), (rc))
#endif

#endif
