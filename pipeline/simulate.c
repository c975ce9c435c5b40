/* simulate.c - see simulate.h (being written). */
#include "pipeline/simulate.h"
