/* render.c - see render.h (being written). */
#include "pipeline/render.h"
