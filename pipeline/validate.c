/* validate.c - see validate.h (being written). */
#include "pipeline/validate.h"
