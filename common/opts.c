/* opts.c - flags, config file and --help from one option table (see opts.h). */
#include "common/opts.h"

#include "common/log.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

static const struct dx_opt *opts_find(const struct dx_opt *opts, const char *name, size_t len)
{
    for (const struct dx_opt *o = opts; o->name; o++) {
        if (strlen(o->name) == len && strncmp(o->name, name, len) == 0)
            return o;
    }
    return NULL;
}

static int opts_set_string(const struct dx_opt *o, const char *text, char *err, size_t errlen)
{
    char **slot = o->value;
    char *copy = NULL;

    if (text) {
        copy = strdup(text);
        if (!copy)
            return dx_errf(err, errlen, -ENOMEM, "out of memory");
    }
    free(*slot);
    *slot = copy;
    return 0;
}

static int opts_set_int(const struct dx_opt *o, const char *source, const char *text, char *err,
                        size_t errlen)
{
    char *end = NULL;
    long v;

    errno = 0;
    v = strtol(text, &end, 10);
    if (errno || end == text || *end != '\0' || v < o->min || v > o->max)
        return dx_errf(err, errlen, -EINVAL, "%s: expected an integer from %d to %d, got \"%s\"",
                       source, o->min, o->max, text);
    *(int *)o->value = (int)v;
    return 0;
}

static void strv_clear(struct dx_strv *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static int strv_push(struct dx_strv *l, const char *text, char *err, size_t errlen)
{
    char **v = realloc(l->v, (l->n + 1) * sizeof(*v));

    if (v)
        l->v = v;
    if (!v || !(l->v[l->n] = strdup(text)))
        return dx_errf(err, errlen, -ENOMEM, "out of memory");
    l->n++;
    return 0;
}

static int opts_set_defaults(const struct dx_opt *opts, char *err, size_t errlen)
{
    for (const struct dx_opt *o = opts; o->name; o++) {
        switch (o->type) {
        case DX_OPT_STRING:
            if (opts_set_string(o, o->default_str, err, errlen) < 0)
                return -ENOMEM;
            break;
        case DX_OPT_INT:
            *(int *)o->value = o->default_int;
            break;
        case DX_OPT_FLAG:
            *(bool *)o->value = o->default_int != 0;
            break;
        case DX_OPT_LIST:
            strv_clear(o->value);
            break;
        }
    }
    return 0;
}

static int opts_set_json(const struct dx_opt *o, const char *path, json_t *v, char *err,
                         size_t errlen)
{
    char source[PATH_MAX + 64];
    char num[32];

    snprintf(source, sizeof(source), "config %s: key \"%s\"", path, o->name);
    switch (o->type) {
    case DX_OPT_STRING:
        if (!json_is_string(v) || json_string_length(v) == 0)
            return dx_errf(err, errlen, -EINVAL, "%s: expected a non-empty string", source);
        return opts_set_string(o, json_string_value(v), err, errlen);
    case DX_OPT_INT:
        if (!json_is_integer(v))
            return dx_errf(err, errlen, -EINVAL, "%s: expected an integer", source);
        if (json_integer_value(v) < o->min || json_integer_value(v) > o->max)
            return dx_errf(err, errlen, -EINVAL, "%s: expected an integer from %d to %d, got %lld",
                           source, o->min, o->max, (long long)json_integer_value(v));
        snprintf(num, sizeof(num), "%lld", (long long)json_integer_value(v));
        return opts_set_int(o, source, num, err, errlen);
    case DX_OPT_LIST: {
        size_t i;
        json_t *item;
        if (!json_is_array(v))
            return dx_errf(err, errlen, -EINVAL, "%s: expected an array of strings", source);
        strv_clear(o->value);
        json_array_foreach (v, i, item) {
            if (!json_is_string(item) || json_string_length(item) == 0)
                return dx_errf(err, errlen, -EINVAL, "%s: item %zu is not a non-empty string",
                               source, i);
            if (strv_push(o->value, json_string_value(item), err, errlen) < 0)
                return -ENOMEM;
        }
        return 0;
    }
    case DX_OPT_FLAG:
        if (!json_is_boolean(v))
            return dx_errf(err, errlen, -EINVAL, "%s: expected true or false", source);
        *(bool *)o->value = json_is_true(v);
        return 0;
    }
    return -EINVAL;
}

int dx_opts_load_file(const struct dx_opt *opts, const char *path, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    const char *key;
    json_t *value;
    int rc = 0;

    if (!root) {
        if (jerr.line <= 0)
            return dx_errf(err, errlen, -EINVAL, "config %s: %s", path, jerr.text);
        return dx_errf(err, errlen, -EINVAL, "config %s:%d:%d: %s", path, jerr.line, jerr.column,
                       jerr.text);
    }
    if (!json_is_object(root)) {
        rc = dx_errf(err, errlen, -EINVAL,
                     "config %s: expected a JSON object of option names to values", path);
        goto out;
    }
    json_object_foreach (root, key, value) {
        const struct dx_opt *o = opts_find(opts, key, strlen(key));
        if (!o || strcmp(key, "config") == 0) {
            rc = dx_errf(err, errlen, -EINVAL, "config %s: unknown key \"%s\"", path, key);
            goto out;
        }
        rc = opts_set_json(o, path, value, err, errlen);
        if (rc < 0)
            goto out;
    }
out:
    json_decref(root);
    return rc;
}

/* Scans the options before the first positional argument for --help and
 * --config, skipping the values of options that take one. Returns
 * DX_OPTS_HELP when help was asked for (so a broken config file does not
 * hide the help), else DX_OPTS_OK with *config set (or NULL). */
static int opts_prescan(const struct dx_opt *opts, int argc, char **argv, const char **config)
{
    *config = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *eq = strchr(a, '=');
        const struct dx_opt *o;

        if (strcmp(a, "--") == 0 || a[0] != '-' || a[1] == '\0')
            break;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0)
            return DX_OPTS_HELP;
        if (a[1] != '-')
            continue;
        o = opts_find(opts, a + 2, eq ? (size_t)(eq - a - 2) : strlen(a + 2));
        if (!o || o->type == DX_OPT_FLAG || eq) {
            if (o && eq && strcmp(o->name, "config") == 0)
                *config = eq + 1;
            continue;
        }
        if (i + 1 < argc && strcmp(o->name, "config") == 0)
            *config = argv[i + 1];
        i++; /* skip the value */
    }
    return DX_OPTS_OK;
}

const char *dx_opts_take_arg(const struct dx_opt *opts, int *argc, char **argv)
{
    for (int i = 1; i < *argc; i++) {
        const char *a = argv[i];
        const struct dx_opt *o;

        if (strcmp(a, "--") == 0) {
            i++;
        } else if (a[0] == '-' && a[1] != '\0') {
            o = a[1] == '-' && !strchr(a, '=') ? opts_find(opts, a + 2, strlen(a + 2)) : NULL;
            if (o && o->type != DX_OPT_FLAG)
                i++; /* skip the option's value */
            continue;
        }
        if (i >= *argc)
            return NULL;
        a = argv[i];
        memmove(&argv[i], &argv[i + 1], (size_t)(*argc - i - 1) * sizeof(*argv));
        (*argc)--;
        return a;
    }
    return NULL;
}

int dx_opts_parse(const struct dx_opt *opts, int argc, char **argv, int *next_arg, char *err,
                  size_t errlen)
{
    const struct dx_opt *config_opt = opts_find(opts, "config", 6);
    const char *config_path;
    int rc, i;

    rc = opts_set_defaults(opts, err, errlen);
    if (rc < 0)
        return rc;
    if (opts_prescan(opts, argc, argv, &config_path) == DX_OPTS_HELP)
        return DX_OPTS_HELP;
    if (config_opt && config_path) {
        rc = dx_opts_load_file(opts, config_path, err, errlen);
        if (rc < 0)
            return rc;
    }

    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *name, *eq, *value = NULL;
        const struct dx_opt *o;
        char source[128];

        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (a[0] != '-' || a[1] == '\0')
            break;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0)
            return DX_OPTS_HELP;
        if (strcmp(a, "--version") == 0)
            return DX_OPTS_VERSION;
        if (a[1] != '-')
            return dx_errf(err, errlen, -EINVAL, "unknown option %s (options are long: --name)", a);
        name = a + 2;
        eq = strchr(name, '=');
        o = opts_find(opts, name, eq ? (size_t)(eq - name) : strlen(name));
        if (!o)
            return dx_errf(err, errlen, -EINVAL, "unknown option --%.*s",
                           eq ? (int)(eq - name) : (int)strlen(name), name);
        snprintf(source, sizeof(source), "--%s", o->name);
        if (o->type == DX_OPT_FLAG) {
            if (eq)
                return dx_errf(err, errlen, -EINVAL, "%s takes no value", source);
            *(bool *)o->value = true;
            continue;
        }
        if (eq) {
            value = eq + 1;
        } else if (i + 1 < argc) {
            value = argv[++i];
        } else {
            return dx_errf(err, errlen, -EINVAL, "%s needs a value (%s)", source,
                           o->metavar ? o->metavar : "");
        }
        if (o->type == DX_OPT_STRING || o->type == DX_OPT_LIST) {
            if (value[0] == '\0') // NOLINT(clang-analyzer-core.NullDereference): argv[i < argc]
                return dx_errf(err, errlen, -EINVAL, "%s: value must not be empty", source);
            rc = o->type == DX_OPT_STRING ? opts_set_string(o, value, err, errlen)
                                          : strv_push(o->value, value, err, errlen);
        } else {
            rc = opts_set_int(o, source, value, err, errlen);
        }
        if (rc < 0)
            return rc;
    }
    if (next_arg)
        *next_arg = i;
    return DX_OPTS_OK;
}

void dx_opts_usage(FILE *out, const char *synopsis, const struct dx_opt *opts)
{
    fprintf(out, "usage: %s\n\noptions:\n", synopsis);
    for (const struct dx_opt *o = opts; o->name; o++) {
        char flag[64];
        char dflt[96] = "";

        if (o->type == DX_OPT_FLAG)
            snprintf(flag, sizeof(flag), "--%s", o->name);
        else
            snprintf(flag, sizeof(flag), "--%s %s", o->name, o->metavar ? o->metavar : "VALUE");
        /* a help text that states its default itself keeps it; an int
         * default outside [min, max] means "not given" and is not shown */
        bool own = strstr(o->help, "(default") != NULL;

        if (o->type == DX_OPT_STRING && o->default_str && !own)
            snprintf(dflt, sizeof(dflt), " (default %s)", o->default_str);
        else if (o->type == DX_OPT_INT && !own && o->default_int >= o->min &&
                 o->default_int <= o->max)
            snprintf(dflt, sizeof(dflt), " (default %d)", o->default_int);
        else if (o->type == DX_OPT_LIST)
            snprintf(dflt, sizeof(dflt), " (repeatable)");
        fprintf(out, "  %-26s %s%s\n", flag, o->help, dflt);
    }
    fprintf(out, "  %-26s %s\n", "--help", "show this help and exit");
}

bool dx_opts_cli(const struct dx_opt *opts, const struct dx_cli *cli, int argc, char **argv,
                 int *next_arg, int *exit_status)
{
    enum dx_log_level level;
    char err[512];
    int next;
    int rc = dx_opts_parse(opts, argc, argv, &next, err, sizeof(err));

    *exit_status = 0;
    if (rc == DX_OPTS_HELP) {
        if (cli->usage)
            cli->usage(stdout);
        else
            dx_opts_usage(stdout, cli->synopsis, opts);
        return false;
    }
    if (rc == DX_OPTS_VERSION) {
        printf("%s %s\n", cli->prog, cli->version);
        return false;
    }
    *exit_status = DX_OPTS_EXIT_USAGE;
    if (rc < 0) {
        fprintf(stderr, "%s: %s (see --help)\n", cli->prog, err);
        return false;
    }
    if (!next_arg && next < argc) {
        fprintf(stderr, "%s: unexpected argument \"%s\" (see --help)\n", cli->prog, argv[next]);
        return false;
    }
    if (cli->log_level) {
        if (dx_log_level_parse(*cli->log_level, &level) < 0) {
            fprintf(stderr, "%s: --log-level: \"%s\" is not debug, info, warn or error\n",
                    cli->prog, *cli->log_level);
            return false;
        }
        dx_log_set_level(level);
    }
    if (next_arg)
        *next_arg = next;
    *exit_status = 0;
    return true;
}

void dx_opts_free(const struct dx_opt *opts)
{
    for (const struct dx_opt *o = opts; o->name; o++) {
        if (o->type == DX_OPT_STRING) {
            free(*(char **)o->value);
            *(char **)o->value = NULL;
        }
        if (o->type == DX_OPT_LIST)
            strv_clear(o->value);
    }
}
