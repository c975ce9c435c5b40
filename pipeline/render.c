/* render.c - a schedule as text: the compact op list, a terminal timeline,
 * JSON and SVG (see render.h). Everything is built in memory with
 * open_memstream; nothing here reads or writes files. */
#include "pipeline/render.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* text: the timeline is this many columns wide, with a tick about every
 * TEXT_TICK_COLUMNS columns. */
#define TEXT_COLUMNS 120
#define TEXT_TICK_COLUMNS 10

/* json: significant digits of times and costs. */
#define JSON_PRECISION 12
#define JSON_FLAGS (JSON_REAL_PRECISION(JSON_PRECISION) | JSON_PRESERVE_ORDER)

/* svg geometry, in pixels. */
#define SVG_TIMELINE_PX 1200.0
#define SVG_LEFT_PX 72.0
#define SVG_RIGHT_PX 24.0
#define SVG_TOP_PX 40.0
#define SVG_ROW_PX 28.0
#define SVG_BOX_PX 22.0
#define SVG_AXIS_PX 30.0
#define SVG_LEGEND_PX 52.0
#define SVG_LEGEND_LINE_PX 20.0
#define SVG_FONT_PX 11.0
#define SVG_MIN_FONT_PX 4.0
#define SVG_CHAR_EM 0.62 /* a digit's width, in font sizes */
#define SVG_TICK_PX 80.0 /* about one time label per this many pixels */

#define LABEL_LEN 48

static const struct {
    const char *name;
    enum dp_render_format format;
} format_names[] = {
    {"text", DP_RENDER_TEXT},
    {"compact", DP_RENDER_COMPACT},
    {"json", DP_RENDER_JSON},
    {"svg", DP_RENDER_SVG},
};

int dp_render_format_parse(const char *name, enum dp_render_format *out)
{
    for (size_t i = 0; i < sizeof(format_names) / sizeof(format_names[0]); i++) {
        if (strcmp(name, format_names[i].name) == 0) {
            *out = format_names[i].format;
            return 0;
        }
    }
    return -EINVAL;
}

/* ---- shared helpers ------------------------------------------------------ */

/* 'd' for chunk 0, 'u' for chunk 1 (DualPipe: direction; DualPipeV: leg). */
static char leg(int chunk)
{
    return chunk == 0 ? 'd' : 'u';
}

/* "3d" */
static void work_label(const struct dp_work *w, char *buf, size_t len)
{
    snprintf(buf, len, "%d%c", w->mb, leg(w->chunk));
}

/* The compact name of a compute op: "F3d", "W0u", "(F3d;B1u)". */
static void op_label(const struct dp_op *op, char *buf, size_t len)
{
    if (op->kind == DP_OP_FB)
        snprintf(buf, len, "(F%d%c;B%d%c)", op->work.mb, leg(op->work.chunk), op->work2.mb,
                 leg(op->work2.chunk));
    else
        snprintf(buf, len, "%s%d%c", dp_op_kind_name(op->kind), op->work.mb, leg(op->work.chunk));
}

/* Rounds a non-negative x to the nearest integer (no libm). */
static long round_nonneg(double x)
{
    return x <= 0 ? 0 : (long)(x + 0.5);
}

/* A tick step of 1, 2 or 5 times a power of ten that is at least raw. */
static double nice_step(double raw)
{
    double p = 1.0;

    if (raw <= 0)
        return 1.0;
    while (p * 10 <= raw)
        p *= 10;
    while (p > raw)
        p /= 10;
    if (p >= raw)
        return p;
    if (2 * p >= raw)
        return 2 * p;
    if (5 * p >= raw)
        return 5 * p;
    return 10 * p;
}

static int finish_stream(FILE *f, char **buf, size_t *blen, char **text, size_t *len)
{
    int bad = ferror(f);

    if (fclose(f) != 0 || bad) {
        free(*buf);
        *buf = NULL;
        return -ENOMEM;
    }
    *text = *buf;
    *len = *blen;
    *buf = NULL;
    return 0;
}

/* ---- compact --------------------------------------------------------------- */

static void render_compact(FILE *f, const dp_sched_t *s)
{
    char label[LABEL_LEN];

    for (int r = 0; r < dp_sched_ranks(s); r++) {
        size_t n;
        const struct dp_op *ops = dp_sched_ops(s, r, &n);

        fprintf(f, "rank %d:", r);
        for (size_t i = 0; i < n; i++) {
            if (!dp_op_is_compute(ops[i].kind))
                continue;
            op_label(&ops[i], label, sizeof(label));
            fprintf(f, " %s", label);
        }
        fputc('\n', f);
    }
}

/* ---- text ------------------------------------------------------------------ */

static char text_mark(enum dp_op_kind kind)
{
    switch (kind) {
    case DP_OP_F:
        return 'F';
    case DP_OP_B:
        return 'B';
    case DP_OP_I:
        return 'I';
    case DP_OP_W:
        return 'W';
    case DP_OP_FB:
        return '#';
    default:
        return '?';
    }
}

static int digits(long v)
{
    int d = 1;

    while (v >= 10) {
        v /= 10;
        d++;
    }
    return d;
}

/* Draws one op into row[0..TEXT_COLUMNS): its mark in the first column, '-'
 * after it, and the micro-batch label after the mark where it fits. */
static void text_draw_op(char *row, const struct dp_op *op, double start, double end, double scale)
{
    long c0 = round_nonneg(start * scale), c1 = round_nonneg(end * scale);
    char label[LABEL_LEN], a[LABEL_LEN / 2], b[LABEL_LEN / 2];
    size_t llen;

    if (c0 >= TEXT_COLUMNS)
        c0 = TEXT_COLUMNS - 1;
    if (c1 > TEXT_COLUMNS)
        c1 = TEXT_COLUMNS;
    if (c1 <= c0)
        c1 = c0 + 1;
    row[c0] = text_mark(op->kind);
    for (long c = c0 + 1; c < c1; c++)
        row[c] = '-';
    work_label(&op->work, a, sizeof(a));
    if (op->kind == DP_OP_FB) {
        work_label(&op->work2, b, sizeof(b));
        snprintf(label, sizeof(label), "%s/%s", a, b);
    } else {
        snprintf(label, sizeof(label), "%s", a);
    }
    llen = strlen(label);
    if ((long)llen <= c1 - c0 - 1)
        memcpy(row + c0 + 1, label, llen);
}

static void text_axis(FILE *f, int pad, double makespan, double scale)
{
    char marks[TEXT_COLUMNS + 1], labels[TEXT_COLUMNS + 16];
    double step = nice_step(makespan * TEXT_TICK_COLUMNS / TEXT_COLUMNS);
    long free_from = 0;

    memset(marks, '-', TEXT_COLUMNS);
    marks[TEXT_COLUMNS] = '\0';
    memset(labels, ' ', sizeof(labels) - 1);
    labels[sizeof(labels) - 1] = '\0';
    for (long k = 0;; k++) {
        double t = k * step;
        long c = round_nonneg(t * scale);
        char num[32];
        int n;

        if (t > makespan * (1 + 1e-9) || c > TEXT_COLUMNS || scale <= 0)
            break;
        if (c < TEXT_COLUMNS)
            marks[c] = '+';
        n = snprintf(num, sizeof(num), "%g", t);
        if (c >= free_from && c + n < (long)sizeof(labels)) {
            memcpy(labels + c, num, (size_t)n);
            free_from = c + n + 1;
        }
    }
    /* trim the labels' trailing blanks */
    for (long c = (long)sizeof(labels) - 2; c >= 0 && labels[c] == ' '; c--)
        labels[c] = '\0';
    fprintf(f, "%*s +%s+\n", pad, "", marks);
    fprintf(f, "%*s  %s\n", pad, "", labels);
}

static void print_costs(FILE *f, const struct dp_costs *c)
{
    fprintf(f, "F=%g B=%g I=%g W=%g FB=%g latency=%g bandwidth=%g act_bytes=%g grad_bytes=%g", c->f,
            c->b, c->i, c->w, c->fb, c->latency, c->bandwidth, c->act_bytes, c->grad_bytes);
}

static int render_text(FILE *f, const dp_sched_t *s, const struct dp_validation *v,
                       const struct dp_costs *c, const struct dp_sim_result *r)
{
    int P = dp_sched_ranks(s);
    double scale = r->makespan > 0 ? TEXT_COLUMNS / r->makespan : 0;
    int pad = 5 + digits(P - 1); /* "rank " and the number */
    char row[TEXT_COLUMNS + 1];

    for (int rank = 0; rank < P; rank++) {
        size_t n;
        const struct dp_op *ops = dp_sched_ops(s, rank, &n);

        memset(row, '.', TEXT_COLUMNS);
        row[TEXT_COLUMNS] = '\0';
        for (size_t i = 0; i < n; i++) {
            if (dp_op_is_compute(ops[i].kind))
                text_draw_op(row, &ops[i], r->start[rank][i], r->end[rank][i], scale);
        }
        fprintf(f, "rank %*d |%s|\n", pad - 5, rank, row);
    }
    text_axis(f, pad, r->makespan, scale);
    fprintf(f,
            "\nlegend: F forward, B backward, I input-gradient backward, W weight-gradient job,\n"
            "        # overlapped forward+backward (F&B), - the op goes on, . idle;\n"
            "        3d = micro-batch 3 on chunk d (d/u: direction, or leg of the V), "
            "#3d/1u = F 3d with B 1u\n\n");

    fprintf(f, "schedule          %s: %d ranks, %d micro-batches, %d stages, %d chunk%s per rank\n",
            dp_sched_kind_name(dp_sched_kind(s)), P, dp_sched_microbatches(s), dp_sched_stages(s),
            dp_sched_chunks_per_rank(s), dp_sched_chunks_per_rank(s) == 1 ? "" : "s");
    fprintf(f, "costs             ");
    print_costs(f, c);
    fprintf(f, "\nmakespan          %g\n", r->makespan);
    fprintf(f, "bubble            %g (the largest per-rank idle time)\n", r->bubble);
    fprintf(f, "idle per rank    ");
    for (int rank = 0; rank < P; rank++)
        fprintf(f, " %g", r->idle[rank]);
    fprintf(f, "\npeak activations  max %d; per rank:", v->max_peak_activations);
    for (int rank = 0; rank < P; rank++)
        fprintf(f, " %d", v->peak_activations[rank]);
    fprintf(f, "\nparameter copies  %d per rank\n", v->param_copies);
    return 0;
}

/* ---- json ------------------------------------------------------------------ */

static json_t *work_json(const struct dp_work *w)
{
    return json_pack("{s:i, s:i, s:i, s:i}", "path", w->path, "mb", w->mb, "stage", w->stage,
                     "chunk", w->chunk);
}

static json_t *op_json(const struct dp_op *op, size_t index, double start, double end)
{
    json_t *o = json_pack("{s:I, s:s, s:i, s:i, s:i, s:i}", "index", (json_int_t)index, "kind",
                          dp_op_kind_name(op->kind), "path", op->work.path, "mb", op->work.mb,
                          "stage", op->work.stage, "chunk", op->work.chunk);

    if (!o)
        return NULL;
    if (op->kind == DP_OP_FB && json_object_set_new(o, "backward", work_json(&op->work2)) < 0)
        goto fail;
    if ((op->kind == DP_OP_SEND || op->kind == DP_OP_RECV) &&
        (json_object_set_new(o, "peer", json_integer(op->peer)) < 0 ||
         json_object_set_new(
             o, "payload", json_string(op->payload == DP_ACTIVATION ? "activation" : "gradient")) <
             0))
        goto fail;
    if (json_object_set_new(o, "start", json_real(start)) < 0 ||
        json_object_set_new(o, "end", json_real(end)) < 0)
        goto fail;
    return o;
fail:
    json_decref(o);
    return NULL;
}

/* Writes o without its closing brace, so that more members can follow. */
static int dump_open(FILE *f, const json_t *o, size_t flags)
{
    char *s = json_dumps(o, flags);
    size_t n;
    int rc = -ENOMEM;

    if (!s)
        return rc;
    n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' '))
        n--;
    if (n == 0 || s[n - 1] != '}')
        goto out;
    n--;
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' '))
        n--;
    if (fwrite(s, 1, n, f) == n)
        rc = 0;
out:
    free(s);
    return rc;
}

static json_t *header_json(const dp_sched_t *s, const struct dp_validation *v,
                           const struct dp_costs *c, const struct dp_sim_result *r)
{
    return json_pack(
        "{s:s, s:i, s:i, s:i, s:i,"
        " s:{s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f},"
        " s:{s:f, s:f, s:i, s:i}}",
        "schedule", dp_sched_kind_name(dp_sched_kind(s)), "ranks", dp_sched_ranks(s),
        "microbatches", dp_sched_microbatches(s), "stages", dp_sched_stages(s), "chunks_per_rank",
        dp_sched_chunks_per_rank(s), "costs", "F", c->f, "B", c->b, "I", c->i, "W", c->w, "FB",
        c->fb, "latency", c->latency, "bandwidth", c->bandwidth, "act_bytes", c->act_bytes,
        "grad_bytes", c->grad_bytes, "summary", "makespan", r->makespan, "bubble", r->bubble,
        "max_peak_activations", v->max_peak_activations, "param_copies", v->param_copies);
}

/* The ranks' ops can be millions of values: each op is built, written and
 * freed on its own instead of building one tree for the whole document. */
static int render_json(FILE *f, const dp_sched_t *s, const struct dp_validation *v,
                       const struct dp_costs *c, const struct dp_sim_result *r)
{
    json_t *head = header_json(s, v, c, r), *o = NULL;
    int rc = -ENOMEM;

    if (!head || dump_open(f, head, JSON_INDENT(2) | JSON_FLAGS) < 0)
        goto out;
    fprintf(f, ",\n  \"ranks_detail\": [");
    for (int rank = 0; rank < dp_sched_ranks(s); rank++) {
        size_t n;
        const struct dp_op *ops = dp_sched_ops(s, rank, &n);

        o = json_pack("{s:i, s:f, s:f, s:i}", "rank", rank, "busy", r->busy[rank], "idle",
                      r->idle[rank], "peak_activations", v->peak_activations[rank]);
        fprintf(f, "%s\n    ", rank ? "," : "");
        if (!o || dump_open(f, o, JSON_FLAGS) < 0)
            goto out;
        json_decref(o);
        o = NULL;
        fprintf(f, ", \"ops\": [");
        for (size_t i = 0; i < n; i++) {
            o = op_json(&ops[i], i, r->start[rank][i], r->end[rank][i]);
            fprintf(f, "%s\n      ", i ? "," : "");
            if (!o || json_dumpf(o, f, JSON_FLAGS) < 0)
                goto out;
            json_decref(o);
            o = NULL;
        }
        fprintf(f, "%s]}", n ? "\n    " : "");
    }
    fprintf(f, "\n  ]\n}\n");
    rc = 0;
out:
    json_decref(o);
    json_decref(head);
    return rc;
}

/* ---- svg ------------------------------------------------------------------- */

static const char *svg_fill(enum dp_op_kind kind)
{
    switch (kind) {
    case DP_OP_F:
        return "#8ecae6"; /* blue */
    case DP_OP_B:
        return "#f4a261"; /* orange */
    case DP_OP_I:
        return "#e9c46a"; /* yellow */
    case DP_OP_W:
        return "#90be6d"; /* green */
    case DP_OP_FB:
        return "#c77dff"; /* purple: the outline of an overlapped pair */
    default:
        return "#cccccc";
    }
}

/* Writes text with &, <, >, " and ' escaped. */
static void xml_text(FILE *f, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '&':
            fputs("&amp;", f);
            break;
        case '<':
            fputs("&lt;", f);
            break;
        case '>':
            fputs("&gt;", f);
            break;
        case '"':
            fputs("&quot;", f);
            break;
        case '\'':
            fputs("&apos;", f);
            break;
        default:
            fputc(*s, f);
        }
    }
}

/* A centred label in a box of width w at (x, y), if it fits readably. */
static void svg_label(FILE *f, double x, double y, double w, const char *label)
{
    double size = w / (SVG_CHAR_EM * (double)(strlen(label) + 1));

    if (size > SVG_FONT_PX)
        size = SVG_FONT_PX;
    if (size < SVG_MIN_FONT_PX)
        return;
    fprintf(f, "<text x=\"%.2f\" y=\"%.2f\" font-size=\"%.1f\">", x + w / 2,
            y + SVG_BOX_PX / 2 + size / 3, size);
    xml_text(f, label);
    fputs("</text>", f);
}

static void svg_op(FILE *f, const struct dp_op *op, int rank, size_t index, double x0, double x1,
                   double y, double start, double end)
{
    char a[LABEL_LEN / 2], b[LABEL_LEN / 2], title[LABEL_LEN * 4], label[LABEL_LEN];
    double w = x1 - x0;

    op_label(op, label, sizeof(label));
    snprintf(title, sizeof(title), "rank %d op %zu: %s, %g to %g", rank, index, label, start, end);
    work_label(&op->work, a, sizeof(a));
    fprintf(f, "<g class=\"op %s\"><title>", dp_op_kind_name(op->kind));
    xml_text(f, title);
    fputs("</title>", f);
    if (op->kind == DP_OP_FB) {
        /* the forward's half on the left, the backward's on the right */
        work_label(&op->work2, b, sizeof(b));
        fprintf(f,
                "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\"/>"
                "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\"/>"
                "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"none\" "
                "stroke=\"%s\" stroke-width=\"2\"/>",
                x0, y, w / 2, SVG_BOX_PX, svg_fill(DP_OP_F), x0 + w / 2, y, w / 2, SVG_BOX_PX,
                svg_fill(DP_OP_B), x0, y, w, SVG_BOX_PX, svg_fill(DP_OP_FB));
        svg_label(f, x0, y, w / 2, a);
        svg_label(f, x0 + w / 2, y, w / 2, b);
    } else {
        fprintf(f,
                "<rect x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"%s\" "
                "stroke=\"#555555\" stroke-width=\"0.5\"/>",
                x0, y, w, SVG_BOX_PX, svg_fill(op->kind));
        svg_label(f, x0, y, w, a);
    }
    fputs("</g>\n", f);
}

static void svg_axis(FILE *f, double makespan, double scale, double y)
{
    double step = nice_step(makespan * SVG_TICK_PX / SVG_TIMELINE_PX);

    fprintf(f,
            "<g class=\"axis\"><line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" "
            "stroke=\"#333333\"/>\n",
            SVG_LEFT_PX, y, SVG_LEFT_PX + makespan * scale, y);
    for (long k = 0; scale > 0 && k * step <= makespan * (1 + 1e-9); k++) {
        double x = SVG_LEFT_PX + k * step * scale;
        fprintf(f,
                "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#333333\"/>"
                "<text x=\"%.2f\" y=\"%.2f\" font-size=\"%.0f\">%g</text>\n",
                x, y, x, y + 4, x, y + 16, SVG_FONT_PX, k * step);
    }
    fputs("</g>\n", f);
}

static void svg_legend(FILE *f, double y)
{
    static const struct {
        enum dp_op_kind kind;
        const char *text;
    } items[] = {
        {DP_OP_F, "F forward"},
        {DP_OP_B, "B backward"},
        {DP_OP_I, "I input-gradient backward"},
        {DP_OP_W, "W weight-gradient job"},
        {DP_OP_FB, "F&B overlapped (forward | backward)"},
    };
    double x = SVG_LEFT_PX;

    fputs("<g class=\"legend\">\n", f);
    for (size_t i = 0; i < sizeof(items) / sizeof(items[0]); i++) {
        if (items[i].kind == DP_OP_FB)
            fprintf(f,
                    "<rect x=\"%.2f\" y=\"%.2f\" width=\"7\" height=\"14\" fill=\"%s\"/>"
                    "<rect x=\"%.2f\" y=\"%.2f\" width=\"7\" height=\"14\" fill=\"%s\"/>"
                    "<rect x=\"%.2f\" y=\"%.2f\" width=\"14\" height=\"14\" fill=\"none\" "
                    "stroke=\"%s\" stroke-width=\"2\"/>",
                    x, y, svg_fill(DP_OP_F), x + 7, y, svg_fill(DP_OP_B), x, y, svg_fill(DP_OP_FB));
        else
            fprintf(f,
                    "<rect x=\"%.2f\" y=\"%.2f\" width=\"14\" height=\"14\" fill=\"%s\" "
                    "stroke=\"#555555\" stroke-width=\"0.5\"/>",
                    x, y, svg_fill(items[i].kind));
        fprintf(f, "<text x=\"%.2f\" y=\"%.2f\" font-size=\"%.0f\" text-anchor=\"start\">", x + 20,
                y + 11, SVG_FONT_PX);
        xml_text(f, items[i].text);
        fputs("</text>\n", f);
        x += 40 + SVG_CHAR_EM * SVG_FONT_PX * (double)strlen(items[i].text);
    }
    fprintf(f,
            "<text x=\"%.2f\" y=\"%.2f\" font-size=\"%.0f\" text-anchor=\"start\">3d = "
            "micro-batch 3 on chunk d (d/u: the direction, or the leg of the V)</text>\n",
            SVG_LEFT_PX, y + SVG_LEGEND_LINE_PX + 11, SVG_FONT_PX);
    fputs("</g>\n", f);
}

static int render_svg(FILE *f, const dp_sched_t *s, const struct dp_validation *v,
                      const struct dp_sim_result *r)
{
    int P = dp_sched_ranks(s);
    double scale = r->makespan > 0 ? SVG_TIMELINE_PX / r->makespan : 0;
    double rows_end = SVG_TOP_PX + P * SVG_ROW_PX;
    double width = SVG_LEFT_PX + SVG_TIMELINE_PX + SVG_RIGHT_PX;
    double height = rows_end + SVG_AXIS_PX + SVG_LEGEND_PX;
    char title[256];

    snprintf(title, sizeof(title),
             "%s: %d ranks, %d micro-batches; makespan %g, bubble %g, peak activations %d, "
             "%d parameter cop%s per rank",
             dp_sched_kind_name(dp_sched_kind(s)), P, dp_sched_microbatches(s), r->makespan,
             r->bubble, v->max_peak_activations, v->param_copies,
             v->param_copies == 1 ? "y" : "ies");
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
            "viewBox=\"0 0 %.0f %.0f\" font-family=\"monospace\" text-anchor=\"middle\">\n"
            "<title>",
            width, height, width, height);
    xml_text(f, title);
    fprintf(f,
            "</title>\n<rect x=\"0\" y=\"0\" width=\"%.0f\" height=\"%.0f\" fill=\"white\"/>\n"
            "<text x=\"%.2f\" y=\"%.2f\" font-size=\"13\" text-anchor=\"start\">",
            width, height, SVG_LEFT_PX, SVG_TOP_PX - 16);
    xml_text(f, title);
    fputs("</text>\n", f);

    for (int rank = 0; rank < P; rank++) {
        size_t n;
        const struct dp_op *ops = dp_sched_ops(s, rank, &n);
        double y = SVG_TOP_PX + rank * SVG_ROW_PX;

        fprintf(f,
                "<text class=\"rank\" x=\"%.2f\" y=\"%.2f\" font-size=\"%.0f\" "
                "text-anchor=\"end\">rank %d</text>\n",
                SVG_LEFT_PX - 8, y + SVG_BOX_PX / 2 + SVG_FONT_PX / 3, SVG_FONT_PX, rank);
        for (size_t i = 0; i < n; i++) {
            if (!dp_op_is_compute(ops[i].kind))
                continue;
            svg_op(f, &ops[i], rank, i, SVG_LEFT_PX + r->start[rank][i] * scale,
                   SVG_LEFT_PX + r->end[rank][i] * scale, y, r->start[rank][i], r->end[rank][i]);
        }
    }
    svg_axis(f, r->makespan, scale, rows_end);
    svg_legend(f, rows_end + SVG_AXIS_PX);
    fputs("</svg>\n", f);
    return 0;
}

/* ---- entry point ----------------------------------------------------------- */

int dp_render(enum dp_render_format format, const dp_sched_t *s, const struct dp_validation *v,
              const struct dp_costs *c, const struct dp_sim_result *r, char **text, size_t *len)
{
    char *buf = NULL;
    size_t blen = 0;
    FILE *f;
    int rc;

    if (!s || !text || !len)
        return -EINVAL;
    if (format != DP_RENDER_COMPACT &&
        (!v || !c || !r || v->ranks != dp_sched_ranks(s) || r->ranks != dp_sched_ranks(s)))
        return -EINVAL;
    f = open_memstream(&buf, &blen);
    if (!f)
        return -ENOMEM;
    switch (format) {
    case DP_RENDER_COMPACT:
        render_compact(f, s);
        rc = 0;
        break;
    case DP_RENDER_TEXT:
        rc = render_text(f, s, v, c, r);
        break;
    case DP_RENDER_JSON:
        rc = render_json(f, s, v, c, r);
        break;
    case DP_RENDER_SVG:
        rc = render_svg(f, s, v, r);
        break;
    default:
        rc = -EINVAL;
        break;
    }
    if (rc < 0)
        goto fail;
    return finish_stream(f, &buf, &blen, text, len);
fail:
    fclose(f);
    free(buf);
    return rc;
}
