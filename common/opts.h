/* opts.h - one table per program that defines its command-line flags, its
 * config-file keys and its --help text.
 *
 * Values come from, in rising precedence: the table's defaults, a JSON config
 * file (when the table has a string option named "config" and it is given on
 * the command line), then the command line. Flags are long only:
 * "--name value" or "--name=value". Parsing stops at the first argument that
 * is not an option (a subcommand) or after "--".
 */
#ifndef DX_OPTS_H
#define DX_OPTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

enum dx_opt_type {
    DX_OPT_STRING, /* value: char **, malloc'd by the parser */
    DX_OPT_INT,    /* value: int *, checked against [min, max] */
    DX_OPT_FLAG,   /* value: bool *, takes no argument */
    DX_OPT_LIST,   /* value: struct dx_strv *, repeatable; a JSON array in config */
};

/* The values of a repeatable option, in the order given. */
struct dx_strv {
    char **v;
    size_t n;
};

struct dx_opt {
    const char *name; /* flag without "--", and config-file key */
    enum dx_opt_type type;
    void *value;
    const char *default_str; /* DX_OPT_STRING: default (may be NULL) */
    int default_int;         /* DX_OPT_INT and DX_OPT_FLAG default */
    int min, max;            /* DX_OPT_INT bounds */
    const char *metavar;     /* shown in --help, e.g. "ADDR" */
    const char *help;
};

/* The table ends with an entry whose name is NULL. */

enum {
    DX_OPTS_OK = 0,
    DX_OPTS_HELP = 1,    /* --help or -h was given */
    DX_OPTS_VERSION = 2, /* --version was given */
};

/* Fills every value from defaults, config file and argv[1..]. String values
 * must start out NULL (or hold what an earlier parse set: it is freed). On success
 * returns DX_OPTS_OK, DX_OPTS_HELP or DX_OPTS_VERSION and sets *next_arg to
 * the index of the first argument not consumed. On error returns -EINVAL
 * (or -ENOMEM) with a message naming the flag or key in err. */
int dx_opts_parse(const struct dx_opt *opts, int argc, char **argv, int *next_arg, char *err,
                  size_t errlen);

/* Removes the first positional argument from argv (options may come before
 * or after it; the values of options that take one are skipped) and
 * returns it, or NULL when there is none. For commands like
 * "submit JOB.json --dry-run". */
const char *dx_opts_take_arg(const struct dx_opt *opts, int *argc, char **argv);

/* Loads one JSON config file into the table's values (used by dx_opts_parse;
 * exposed for tests). */
int dx_opts_load_file(const struct dx_opt *opts, const char *path, char *err, size_t errlen);

/* Prints "usage: SYNOPSIS" and one line per option. */
void dx_opts_usage(FILE *out, const char *synopsis, const struct dx_opt *opts);

/* How a program presents itself on its command line. */
struct dx_cli {
    const char *prog;         /* "duplexd" */
    const char *synopsis;     /* for --help: usage line, blank line, one-line summary */
    const char *version;      /* for --version: "0.1.0 (protocol 1)" */
    void (*usage)(FILE *out); /* prints --help instead of the generated text (optional) */
    char *const *log_level;   /* an option's value to apply with dx_log_set_level (optional) */
};

/* The whole front of a program's command line: parses, answers --help and
 * --version on stdout, reports a bad option (or, when next_arg is NULL, any
 * positional argument) on stderr as "PROG: problem (see --help)", and
 * applies the log level. Returns true to go on; false with *exit_status set
 * (0 after help or version, DX_OPTS_EXIT_USAGE after an error). */
#define DX_OPTS_EXIT_USAGE 2
bool dx_opts_cli(const struct dx_opt *opts, const struct dx_cli *cli, int argc, char **argv,
                 int *next_arg, int *exit_status);

/* Frees every string value the parser allocated and sets them to NULL. */
void dx_opts_free(const struct dx_opt *opts);

#endif
