/* test_opts.c - options: defaults, long flags, errors, JSON config, --help/--version. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/opts.h"

static char *o_config;
static char *o_name;
static char *o_addr;
static int o_port;
static int o_count;
static bool o_verbose;
static bool o_color;

static const struct dx_opt table[] = {
    {.name = "config",
     .type = DX_OPT_STRING,
     .value = &o_config,
     .metavar = "FILE",
     .help = "config file"},
    {.name = "name",
     .type = DX_OPT_STRING,
     .value = &o_name,
     .default_str = "dx",
     .metavar = "NAME",
     .help = "a name"},
    {.name = "addr",
     .type = DX_OPT_STRING,
     .value = &o_addr,
     .metavar = "ADDR",
     .help = "no default"},
    {.name = "port",
     .type = DX_OPT_INT,
     .value = &o_port,
     .default_int = 5555,
     .min = 1,
     .max = 65535,
     .metavar = "PORT",
     .help = "a port"},
    {.name = "count",
     .type = DX_OPT_INT,
     .value = &o_count,
     .default_int = 3,
     .min = -5,
     .max = 10,
     .metavar = "N",
     .help = "a count"},
    {.name = "verbose", .type = DX_OPT_FLAG, .value = &o_verbose, .help = "talk more"},
    {.name = "color",
     .type = DX_OPT_FLAG,
     .value = &o_color,
     .default_int = 1,
     .help = "default-on flag"},
    {.name = NULL},
};

/* A table without a "config" option: --config is then just unknown. */
static char *p_name;
static const struct dx_opt plain_table[] = {
    {.name = "name", .type = DX_OPT_STRING, .value = &p_name, .default_str = "p", .help = "a name"},
    {.name = NULL},
};

static char err[512];
static char cfg_path[64];

static void cleanup(void)
{
    dx_opts_free(table);
    dx_opts_free(plain_table);
    if (cfg_path[0])
        unlink(cfg_path);
    cfg_path[0] = '\0';
}

static void setup(void)
{
    err[0] = '\0';
    cfg_path[0] = '\0';
}

TestSuite(opts, .init = setup, .fini = cleanup);

#define ARGC(v) ((int)(sizeof(v) / sizeof((v)[0])))

/* Parses argv (argv[0] is the program) against table, freeing the strings
 * of an earlier parse first (dx_opts_parse does not free them). */
static int parse(int argc, char **argv, int *next)
{
    dx_opts_free(table);
    *next = -1;
    return dx_opts_parse(table, argc, argv, next, err, sizeof(err));
}

/* Parses and expects -EINVAL with err containing each of up to three words. */
static void expect_error(int argc, char **argv, const char *w1, const char *w2, const char *w3)
{
    int next;
    int rc = parse(argc, argv, &next);

    cr_assert_eq(rc, -EINVAL, "expected -EINVAL, got %d", rc);
    if (w1)
        cr_assert_not_null(strstr(err, w1), "error \"%s\" lacks \"%s\"", err, w1);
    if (w2)
        cr_assert_not_null(strstr(err, w2), "error \"%s\" lacks \"%s\"", err, w2);
    if (w3)
        cr_assert_not_null(strstr(err, w3), "error \"%s\" lacks \"%s\"", err, w3);
}

/* Writes text to a fresh temp file whose path goes in cfg_path. */
static const char *write_config(const char *text)
{
    int fd;
    size_t len = strlen(text);

    snprintf(cfg_path, sizeof(cfg_path), "/tmp/dx-test-opts-XXXXXX");
    fd = mkstemp(cfg_path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, len), (ssize_t)len);
    close(fd);
    return cfg_path;
}

/* ---- command line ------------------------------------------------------------ */

Test(opts, defaults)
{
    char *argv[] = {"prog"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK);
    cr_assert_eq(next, 1);
    cr_assert_null(o_config);
    cr_assert_str_eq(o_name, "dx");
    cr_assert_null(o_addr);
    cr_assert_eq(o_port, 5555);
    cr_assert_eq(o_count, 3);
    cr_assert_eq(o_verbose, false);
    cr_assert_eq(o_color, true);
}

Test(opts, space_and_equals_forms)
{
    char *argv[] = {"prog",   "--port",    "6000",       "--name=alpha",
                    "--addr", "tcp://x:1", "--count=-5", "--verbose"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_eq(next, ARGC(argv));
    cr_assert_eq(o_port, 6000);
    cr_assert_str_eq(o_name, "alpha");
    cr_assert_str_eq(o_addr, "tcp://x:1");
    cr_assert_eq(o_count, -5);
    cr_assert_eq(o_verbose, true);
}

Test(opts, equals_value_may_contain_equals)
{
    char *argv[] = {"prog", "--name=a=b", "--addr", "--weird"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_str_eq(o_name, "a=b");
    /* the value after a string option is taken as is, even if it starts with -- */
    cr_assert_str_eq(o_addr, "--weird");
}

Test(opts, last_value_wins)
{
    char *argv[] = {"prog", "--name", "one", "--name", "two", "--port=1", "--port=65535"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_str_eq(o_name, "two");
    cr_assert_eq(o_port, 65535);
}

Test(opts, int_bounds)
{
    char *lo[] = {"prog", "--port", "0"};
    char *hi[] = {"prog", "--port=65536"};
    char *neg[] = {"prog", "--count", "-6"};
    char *huge[] = {"prog", "--port", "99999999999999999999"};
    char *wrap[] = {"prog", "--port", "4294967297"}; /* 2^32 + 1 */

    expect_error(ARGC(lo), lo, "--port", "1 to 65535", "\"0\"");
    expect_error(ARGC(hi), hi, "--port", "1 to 65535", "65536");
    expect_error(ARGC(neg), neg, "--count", "-5 to 10", NULL);
    expect_error(ARGC(huge), huge, "--port", "1 to 65535", NULL);
    expect_error(ARGC(wrap), wrap, "--port", "1 to 65535", NULL);
}

Test(opts, non_integer)
{
    char *a[] = {"prog", "--port", "abc"};
    char *b[] = {"prog", "--port=12x"};
    char *c[] = {"prog", "--port", "1.5"};
    char *d[] = {"prog", "--port="};

    expect_error(ARGC(a), a, "--port", "integer", "abc");
    expect_error(ARGC(b), b, "--port", "integer", "12x");
    expect_error(ARGC(c), c, "--port", "integer", NULL);
    expect_error(ARGC(d), d, "--port", "integer", NULL);
}

Test(opts, unknown_option)
{
    char *a[] = {"prog", "--bogus"};
    char *b[] = {"prog", "--bogus=1"};
    char *c[] = {"prog", "--por", "1"}; /* no prefix matching */
    char *d[] = {"prog", "--portx=1"};

    expect_error(ARGC(a), a, "unknown option", "--bogus", NULL);
    expect_error(ARGC(b), b, "unknown option", "--bogus", NULL);
    cr_assert_null(strstr(err, "=1"), "error \"%s\" shows only the name", err);
    expect_error(ARGC(c), c, "unknown option", "--por", NULL);
    expect_error(ARGC(d), d, "unknown option", "--portx", NULL);
}

Test(opts, missing_value)
{
    char *a[] = {"prog", "--port"};
    char *b[] = {"prog", "--verbose", "--name"};

    expect_error(ARGC(a), a, "--port", "needs a value", "PORT");
    expect_error(ARGC(b), b, "--name", "needs a value", NULL);
}

Test(opts, flag_with_value_rejected)
{
    char *a[] = {"prog", "--verbose=1"};
    char *b[] = {"prog", "--verbose=true"};

    expect_error(ARGC(a), a, "--verbose", "takes no value", NULL);
    expect_error(ARGC(b), b, "--verbose", "takes no value", NULL);
}

Test(opts, short_options_rejected)
{
    char *a[] = {"prog", "-x"};
    char *b[] = {"prog", "-p", "80"};
    char *c[] = {"prog", "-verbose"};

    expect_error(ARGC(a), a, "unknown option", "-x", NULL);
    expect_error(ARGC(b), b, "-p", NULL, NULL);
    expect_error(ARGC(c), c, "-verbose", NULL, NULL);
}

Test(opts, empty_string_rejected)
{
    char *a[] = {"prog", "--name", ""};
    char *b[] = {"prog", "--name="};

    expect_error(ARGC(a), a, "--name", "empty", NULL);
    expect_error(ARGC(b), b, "--name", "empty", NULL);
}

Test(opts, stops_at_first_positional)
{
    char *argv[] = {"prog", "--port", "6000", "run", "--verbose", "--bogus"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_eq(next, 3);
    cr_assert_str_eq(argv[next], "run");
    cr_assert_eq(o_port, 6000);
    cr_assert_eq(o_verbose, false, "options after the subcommand are not parsed");
}

Test(opts, lone_dash_is_positional)
{
    char *argv[] = {"prog", "-", "--verbose"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_eq(next, 1);
    cr_assert_eq(o_verbose, false);
}

Test(opts, stops_after_double_dash)
{
    char *argv[] = {"prog", "--verbose", "--", "--port", "1"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_eq(next, 3);
    cr_assert_str_eq(argv[next], "--port");
    cr_assert_eq(o_verbose, true);
    cr_assert_eq(o_port, 5555);

    char *end[] = {"prog", "--"};
    cr_assert_eq(parse(ARGC(end), end, &next), DX_OPTS_OK);
    cr_assert_eq(next, 2);
}

Test(opts, next_arg_may_be_null)
{
    char *argv[] = {"prog", "--port", "7"};

    cr_assert_eq(dx_opts_parse(table, ARGC(argv), argv, NULL, err, sizeof(err)), DX_OPTS_OK);
    cr_assert_eq(o_port, 7);
}

Test(opts, help_and_version)
{
    char *h1[] = {"prog", "--help"};
    char *h2[] = {"prog", "--port", "6000", "-h"};
    char *h3[] = {"prog", "--help", "--bogus"};
    char *v1[] = {"prog", "--version"};
    char *v2[] = {"prog", "--verbose", "--version", "--bogus"};
    char *after[] = {"prog", "run", "--help"};
    int next;

    cr_assert_eq(parse(ARGC(h1), h1, &next), DX_OPTS_HELP);
    cr_assert_eq(parse(ARGC(h2), h2, &next), DX_OPTS_HELP);
    cr_assert_eq(parse(ARGC(h3), h3, &next), DX_OPTS_HELP);
    cr_assert_eq(parse(ARGC(v1), v1, &next), DX_OPTS_VERSION);
    cr_assert_eq(parse(ARGC(v2), v2, &next), DX_OPTS_VERSION);
    /* --help after the subcommand belongs to the subcommand */
    cr_assert_eq(parse(ARGC(after), after, &next), DX_OPTS_OK);
    cr_assert_eq(next, 1);
}

/* --help is answered even when the config file given with it is broken. */
Test(opts, help_wins_over_broken_config)
{
    const char *path = write_config("{not json");
    char *argv[] = {"prog", "--config", (char *)path, "--help"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_HELP, "%s", err);
}

Test(opts, usage_lists_every_option)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    cr_assert_not_null(f);
    dx_opts_usage(f, "prog [options] CMD", table);
    fclose(f);
    cr_assert_not_null(strstr(buf, "usage: prog [options] CMD"));
    cr_assert_not_null(strstr(buf, "--port PORT"));
    cr_assert_not_null(strstr(buf, "(default 5555)"));
    cr_assert_not_null(strstr(buf, "--name NAME"));
    cr_assert_not_null(strstr(buf, "(default dx)"));
    cr_assert_not_null(strstr(buf, "--verbose"));
    cr_assert_not_null(strstr(buf, "--help"));
    free(buf);
}

Test(opts, free_resets_strings)
{
    char *argv[] = {"prog", "--name", "n", "--addr", "a"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK);
    cr_assert_not_null(o_name);
    cr_assert_not_null(o_addr);
    dx_opts_free(table);
    cr_assert_null(o_name);
    cr_assert_null(o_addr);
    cr_assert_null(o_config);
    /* freeing again is harmless */
    dx_opts_free(table);
    cr_assert_null(o_name);
}

Test(opts, parse_twice_after_free)
{
    char *a[] = {"prog", "--name", "first"};
    char *b[] = {"prog"};
    int next;

    cr_assert_eq(parse(ARGC(a), a, &next), DX_OPTS_OK);
    cr_assert_str_eq(o_name, "first");
    dx_opts_free(table);
    cr_assert_eq(parse(ARGC(b), b, &next), DX_OPTS_OK);
    cr_assert_str_eq(o_name, "dx");
}

/* ---- config file ----------------------------------------------------------- */

Test(opts, config_values_loaded)
{
    const char *path = write_config("{\"name\": \"fromcfg\", \"port\": 7000, \"verbose\": true,"
                                    " \"color\": false, \"addr\": \"tcp://cfg:1\"}");
    char *argv[] = {"prog", "--config", (char *)path};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_eq(next, 3);
    cr_assert_str_eq(o_config, path);
    cr_assert_str_eq(o_name, "fromcfg");
    cr_assert_str_eq(o_addr, "tcp://cfg:1");
    cr_assert_eq(o_port, 7000);
    cr_assert_eq(o_count, 3, "keys not in the file keep their defaults");
    cr_assert_eq(o_verbose, true);
    cr_assert_eq(o_color, false);
}

Test(opts, config_equals_form)
{
    char arg[128];
    const char *path = write_config("{\"count\": 9}");
    char *argv[] = {"prog", arg};
    int next;

    snprintf(arg, sizeof(arg), "--config=%s", path);
    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_eq(o_count, 9);
}

Test(opts, command_line_overrides_config)
{
    const char *path =
        write_config("{\"name\": \"fromcfg\", \"port\": 7000, \"count\": 9, \"color\": false}");
    /* --config last, with flags before it, so precedence is not just order */
    char *argv[] = {"prog", "--port=8000", "--verbose", "--config", (char *)path, "--color"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_eq(o_port, 8000, "command line wins over the config file");
    cr_assert_eq(o_color, true, "command line wins over the config file");
    cr_assert_str_eq(o_name, "fromcfg");
    cr_assert_eq(o_count, 9);
}

/* The scan for --config must skip the values of earlier "--name value"
 * options instead of stopping at them (it once did, and silently ignored
 * the file). */
Test(opts, config_found_after_spaced_option_value)
{
    const char *path = write_config("{\"name\": \"fromcfg\", \"count\": 9}");
    char *argv[] = {"prog", "--port", "8000", "--config", (char *)path};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_eq(o_port, 8000);
    cr_assert_str_eq(o_config, path);
    cr_expect_eq(o_count, 9, "config file after \"--port 8000\" was not loaded (count %d)",
                 o_count);
    cr_expect_str_eq(o_name, "fromcfg", "config file after \"--port 8000\" was not loaded");
}

Test(opts, config_after_subcommand_is_not_read)
{
    const char *path = write_config("{\"count\": 9}");
    char *argv[] = {"prog", "run", "--config", (char *)path};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK, "%s", err);
    cr_assert_eq(next, 1);
    cr_assert_eq(o_count, 3);
    cr_assert_null(o_config);
}

Test(opts, config_unknown_key)
{
    const char *path = write_config("{\"port\": 7000, \"bogus\": 1}");
    char *argv[] = {"prog", "--config", (char *)path};

    expect_error(ARGC(argv), argv, "unknown key", "bogus", path);
}

Test(opts, config_key_config_is_not_allowed)
{
    const char *path = write_config("{\"config\": \"/etc/other.json\"}");
    char *argv[] = {"prog", "--config", (char *)path};

    expect_error(ARGC(argv), argv, "unknown key", "\"config\"", path);
}

Test(opts, config_wrong_types)
{
    struct {
        const char *json, *key, *want;
    } cases[] = {
        {"{\"port\": \"7000\"}", "port", "expected an integer"},
        {"{\"port\": 7.5}", "port", "expected an integer"},
        {"{\"port\": true}", "port", "expected an integer"},
        {"{\"name\": 5}", "name", "expected a non-empty string"},
        {"{\"name\": null}", "name", "expected a non-empty string"},
        {"{\"name\": [\"a\"]}", "name", "expected a non-empty string"},
        {"{\"name\": \"\"}", "name", "expected a non-empty string"},
        {"{\"verbose\": 1}", "verbose", "expected true or false"},
        {"{\"verbose\": \"true\"}", "verbose", "expected true or false"},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *path = write_config(cases[i].json);
        char *argv[] = {"prog", "--config", (char *)path};

        expect_error(ARGC(argv), argv, cases[i].want, cases[i].key, path);
        dx_opts_free(table);
        unlink(cfg_path);
        cfg_path[0] = '\0';
    }
}

Test(opts, config_int_out_of_range)
{
    const char *cases[] = {"{\"port\": 0}", "{\"port\": 65536}", "{\"port\": 4294967297}",
                           "{\"port\": -9223372036854775808}"};

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *path = write_config(cases[i]);
        char *argv[] = {"prog", "--config", (char *)path};

        expect_error(ARGC(argv), argv, "port", "1 to 65535", path);
        dx_opts_free(table);
        unlink(cfg_path);
        cfg_path[0] = '\0';
    }
}

Test(opts, config_malformed_json_names_file_and_line)
{
    const char *path = write_config("{\n  \"port\": 7000,\n  oops\n}\n");
    char *argv[] = {"prog", "--config", (char *)path};
    char where[128];

    expect_error(ARGC(argv), argv, path, NULL, NULL);
    snprintf(where, sizeof(where), "%s:3:", path);
    cr_assert_not_null(strstr(err, where), "error \"%s\" lacks \"%s\"", err, where);
}

Test(opts, config_duplicate_key_rejected)
{
    const char *path = write_config("{\"port\": 1, \"port\": 2}");
    char *argv[] = {"prog", "--config", (char *)path};

    expect_error(ARGC(argv), argv, path, "port", NULL);
}

Test(opts, config_top_level_not_object)
{
    const char *path = write_config("[1, 2, 3]");
    char *argv[] = {"prog", "--config", (char *)path};

    expect_error(ARGC(argv), argv, path, "JSON object", NULL);
}

Test(opts, config_empty_file)
{
    const char *path = write_config("");
    char *argv[] = {"prog", "--config", (char *)path};

    expect_error(ARGC(argv), argv, path, NULL, NULL);
}

Test(opts, config_missing_file)
{
    char *argv[] = {"prog", "--config", "/nonexistent/dir/duplex.json"};

    expect_error(ARGC(argv), argv, "/nonexistent/dir/duplex.json", NULL, NULL);
}

Test(opts, config_without_config_option_is_unknown)
{
    char *argv[] = {"prog", "--config", "/tmp/x.json"};
    int rc = dx_opts_parse(plain_table, ARGC(argv), argv, NULL, err, sizeof(err));

    cr_assert_eq(rc, -EINVAL);
    cr_assert_not_null(strstr(err, "--config"), "%s", err);
}

Test(opts, load_file_directly)
{
    const char *path = write_config("{\"count\": -2, \"name\": \"direct\"}");
    char *argv[] = {"prog"};
    int next;

    cr_assert_eq(parse(ARGC(argv), argv, &next), DX_OPTS_OK);
    cr_assert_eq(dx_opts_load_file(table, path, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(o_count, -2);
    cr_assert_str_eq(o_name, "direct");
    cr_assert_eq(o_port, 5555);
}

/* Repeatable options collect every value in order; a config file gives them
 * as an array, and the command line replaces nothing but appends. */
Test(opts, list_option_collects_values)
{
    struct dx_strv sets = {0};
    const struct dx_opt lt[] = {
        {.name = "config", .type = DX_OPT_STRING, .value = &o_config, .help = "config file"},
        {.name = "set", .type = DX_OPT_LIST, .value = &sets, .metavar = "K=V", .help = "override"},
        {NULL, 0, NULL, NULL, 0, 0, 0, NULL, NULL},
    };
    char *argv[] = {"prog", "--set", "a=1", "--set=b=2", "--set", "c=3"};
    const char *path = write_config("{\"set\": [\"x=0\"]}");
    char *argv2[] = {"prog", "--config", (char *)path, "--set", "y=1"};
    char *bad[] = {"prog", "--set", ""};
    int next;

    cr_assert_eq(dx_opts_parse(lt, ARGC(argv), argv, &next, err, sizeof(err)), DX_OPTS_OK, "%s",
                 err);
    cr_assert_eq(sets.n, 3);
    cr_assert_str_eq(sets.v[0], "a=1");
    cr_assert_str_eq(sets.v[1], "b=2");
    cr_assert_str_eq(sets.v[2], "c=3");
    cr_assert_eq(dx_opts_parse(lt, ARGC(argv2), argv2, &next, err, sizeof(err)), DX_OPTS_OK, "%s",
                 err);
    cr_assert_eq(sets.n, 2, "defaults reset the list before the config and flags");
    cr_assert_str_eq(sets.v[0], "x=0");
    cr_assert_str_eq(sets.v[1], "y=1");
    cr_assert_lt(dx_opts_parse(lt, ARGC(bad), bad, &next, err, sizeof(err)), 0);
    cr_assert_not_null(strstr(err, "empty"), "%s", err);
    dx_opts_free(lt);
    cr_assert_eq(sets.n, 0);
    cr_assert_null(sets.v);
}

Test(opts, take_arg_finds_the_positional_anywhere)
{
    char *a1[] = {"prog", "--port", "7", "job.json", "--verbose"};
    char *a2[] = {"prog", "--verbose", "--port=8", "--name", "x"};
    char *a3[] = {"prog", "--", "-weird.json"};
    int argc = ARGC(a1);

    cr_assert_str_eq(dx_opts_take_arg(table, &argc, a1), "job.json");
    cr_assert_eq(argc, 4);
    cr_assert_str_eq(a1[3], "--verbose");
    argc = ARGC(a2);
    cr_assert_null(dx_opts_take_arg(table, &argc, a2));
    cr_assert_eq(argc, 5);
    argc = ARGC(a3);
    cr_assert_str_eq(dx_opts_take_arg(table, &argc, a3), "-weird.json");
    cr_assert_eq(argc, 2);
}
