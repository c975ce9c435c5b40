/* rng.h - the model's deterministic random numbers: splitmix64 streams, so
 * that a parameter's initial value depends only on the job's seed and the
 * parameter's own stream id (never on how ranks or threads are laid out). */
#ifndef WK_RNG_H
#define WK_RNG_H

#include <math.h>
#include <stdint.h>

struct wk_rng {
    uint64_t state;
};

/* splitmix64's finaliser: a bijection that scatters nearby inputs. */
static inline uint64_t wk_rng_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* A stream for (seed, stream id): e.g. stream = layer * 1000 + tensor. Seed
 * and stream are both mixed, so nearby streams of a small seed are not
 * shifted copies of one another. */
static inline struct wk_rng wk_rng_stream(uint64_t seed, uint64_t stream)
{
    struct wk_rng r = {wk_rng_mix(seed + 0x9e3779b97f4a7c15ULL) ^
                       wk_rng_mix(stream * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL)};
    return r;
}

static inline uint64_t wk_rng_next(struct wk_rng *r)
{
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Uniform in (0, 1). */
static inline double wk_rng_uniform(struct wk_rng *r)
{
    return ((double)(wk_rng_next(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

/* Standard normal (Box-Muller; one value per call, deterministic). */
static inline float wk_rng_normal(struct wk_rng *r)
{
    double u1 = wk_rng_uniform(r), u2 = wk_rng_uniform(r);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

#endif
